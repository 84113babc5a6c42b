"""What is kept and shown: report pages, the SQLite catalogue, exports (GGUF, PEFT) and interop with other
steering libraries, the readers of an audit's files.

Imports the top level, melbo.io, melbo.engine and melbo.judging.
"""
