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

    layers = melbo.map(lm, ["How can I make a bomb?"], "4:20", "10:28", k=4, out="runs/map")  # every pair's J
    run = melbo.open_pair("runs/map", 6, 20, "runs/map-6-20")  # one pair's directions as an ordinary run
"""

__version__ = "0.1.0"

from melbo.runner import DiscoverConfig, discover, resume  # noqa: E402
from melbo.job import elicit  # noqa: E402
from melbo.errors import MelboError  # noqa: E402
from melbo.generation import Completion, generate  # noqa: E402
from melbo.intervention import SteeringAdapters, SteeringVectors  # noqa: E402
from melbo.models import DEFAULT_MODEL, EMBEDDED, LoadedModel, load_model  # noqa: E402
from melbo.objective import melbo_objective  # noqa: E402
from melbo.store import Run  # noqa: E402
from melbo.divergence import diff  # noqa: E402
from melbo.monitor import Monitor, OutputMonitor  # noqa: E402
from melbo.auditing import audit  # noqa: E402  (the module is melbo.auditing: melbo.audit is the job)
from melbo.trigger_search import invert, triggers  # noqa: E402
from melbo.layermap import LayerMap, open_pair  # noqa: E402
from melbo.layermap import layer_map as map  # noqa: E402,A001  (melbo.map, as the CLI's `melbo map`)

__all__ = [
    "DEFAULT_MODEL", "EMBEDDED", "Completion", "DiscoverConfig", "LayerMap", "LoadedModel", "MelboError", "Monitor", "OutputMonitor", "Run",
    "SteeringAdapters", "SteeringVectors", "audit", "diff", "discover", "elicit", "generate", "load_model", "map", "melbo_objective", "invert", "open_pair", "resume", "triggers",
]
