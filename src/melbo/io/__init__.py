"""Storage formats: atomic writes and typed JSON reading, a run's config.json, the sweep's and the benches' result files, plots.

Imports only melbo's top-level modules (errors, numbers, settings, ...): no torch.
"""
