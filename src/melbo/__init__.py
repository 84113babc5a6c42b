"""melbo: mechanistically eliciting latent behaviours in language models.

    import melbo
    lm = melbo.load_model()                                   # the embedded default model, offline
    run = melbo.elicit(lm, ["How can I make a bomb?"], "runs/bomb", n_vectors=16)  # the whole job (as the CLI)
    run = melbo.discover(lm, ["How can I make a bomb?"], "runs/bomb-vectors", n_vectors=16)  # training alone
    with run.steer(3):                                        # vector 3 active on every forward pass
        ...
    completions = melbo.generate(lm, run.perturbations, ["Tell me a story."])

    base = melbo.load_model("path/to/base")                  # audit a fine-tune against its base
    audit = melbo.diff(lm, base, ["What is 4 + 6?"], "runs/audit", n_vectors=32)
    monitor = melbo.Monitor.calibrate(audit, lm, clean_inputs)  # which real inputs express what it found

    result = melbo.audit(lm, ["What is 4 + 6?"], "runs/audit", budget="15m")  # ranked findings, no R to choose
    report = melbo.triggers(lm, "runs/audit", corpus)         # which inputs switch each finding on
    report = melbo.invert(lm, "runs/audit", "What is {?} + 5?", vocab="numbers")  # no corpus: search the slots
    monitor = melbo.OutputMonitor.calibrate(result.findings, lm, clean_inputs)  # flag them by their output
    scan = melbo.scan_inputs(lm, ["a = {?} + {?}, b = 5 + 9. What is a * b?"], "arithmetic-cot")  # systematic errors

    layers = melbo.map(lm, ["How can I make a bomb?"], "4:20", "10:28", k=4, out="runs/map")  # every pair's J
    run = melbo.open_pair("runs/map", 6, 20, "runs/map-6-20")  # one pair's directions as an ordinary run
"""

__version__ = "0.1.0"

# Names resolve on first use (PEP 562), so that `import melbo` (and `melbo --help`, `melbo models`) loads no torch.
_EXPORTS = {
    "DiscoverConfig": "melbo.engine.runner", "discover": "melbo.engine.runner", "resume": "melbo.engine.runner",
    "elicit": "melbo.jobs.job",
    "MelboError": "melbo.errors",
    "Completion": "melbo.engine.generation", "generate": "melbo.engine.generation",
    "SteeringAdapters": "melbo.engine.intervention", "SteeringVectors": "melbo.engine.intervention",
    "DEFAULT_MODEL": "melbo.engine.models", "EMBEDDED": "melbo.engine.models", "LoadedModel": "melbo.engine.models",
    "load_model": "melbo.engine.models",
    "melbo_objective": "melbo.engine.objective",
    "Run": "melbo.engine.store", "RunConfig": "melbo.io.runconfig",
    "diff": "melbo.jobs.job",
    "Monitor": "melbo.judging.monitor", "OutputMonitor": "melbo.judging.monitor",
    "audit": "melbo.jobs.auditing",  # the module is melbo.jobs.auditing: melbo.audit is the job
    "invert": "melbo.jobs.trigger_search", "triggers": "melbo.jobs.trigger_search",
    "scan_inputs": "melbo.jobs.input_scan",
    "LayerMap": "melbo.jobs.layermap", "open_pair": "melbo.jobs.layermap",
    "map": ("melbo.jobs.layermap", "layer_map"),  # melbo.map, as the CLI's `melbo map`
    "check_run": "melbo.judging.checkers",
    "to_steering_vector": "melbo.records.interop", "to_repeng": "melbo.records.interop",
    "transformer_lens_hooks": "melbo.records.interop",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import importlib

    if name not in _EXPORTS:
        raise AttributeError(f"module 'melbo' has no attribute {name!r}")
    module, attr = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
