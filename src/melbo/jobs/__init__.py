"""The jobs a user starts: elicit and diff, the R sweep, the layer map, the audit, trigger search.

Imports everything above it; only melbo.bench, melbo.cli and melbo.server import it.
"""
