"""Every default setting of a discovery run, in one place: the library and the command line both read them here.

No torch import, so that `melbo --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from melbo.positions import Positions, Spec

DEFAULT_CONTRAST = "difference"  # the contrastive form `melbo diff` trains with; why: melbo.engine.contrastive
# `melbo diff` steers harder than `discover`: a fine-tune is a small change of its base, so in the near-linear
# regime of a small R both models change alike and their difference is small. On the planted-backdoor testbed
# (32 vectors) 0.2x elicited neither planted behaviour, 0.3x and 0.4x both (README, audit mode).
DIFF_RADIUS = "0.3x"
# `melbo audit` (melbo.audit): the wall-clock budget of the whole job, and the tokens of each scan completion.
AUDIT_BUDGET = "15m"
AUDIT_TOKENS = 48
# The audit's scan generation: "fp32", or "auto"/"bf16" (a bf16 copy of the model where the CPU has bf16 units,
# 1.34x the row-tokens/s here, but half the greedy texts differ from fp32's: benchmarks/generation_precision.py).
SCAN_PRECISION = "fp32"
# Rows generated together (melbo.engine.generation.Sampling). On a CPU a decoding step for few rows reads every weight for
# little work: 64 rows cost 2.2x less per row-token than 16 on SmolLM2 (benchmarks/generation_batch.py), and
# rows of one prompt never pad, so the batch changes no token.
GENERATION_BATCH = 64
# `melbo triggers` (melbo.jobs.trigger_search): the top inputs per finding confirmed by generating an answer of
# TRIGGER_TOKENS tokens; the gradient search over slot tokens runs GCG_STEPS steps.
TRIGGER_CONFIRM = 5
TRIGGER_TOKENS = 48
GCG_STEPS = 40
# A checker's pattern is *consistent* (a systematic error, not a slip) when at least this share of a perturbation's
# completions, one per prompt, show it (melbo.judging.checkers; bench subtle, melbo check) or of a filling's
# templates' answers (melbo scan).
CONSISTENT_SHARE = 0.5
# `melbo scan` (melbo.jobs.input_scan): greedy answers of SCAN_TOKENS tokens, SCAN_BATCH prompts at a time; a
# (filling, pattern) is significant below SCAN_ALPHA after Bonferroni; scan.json keeps the SCAN_HITS best.
SCAN_TOKENS = 48
SCAN_BATCH = 32
SCAN_ALPHA = 0.05
SCAN_HITS = 50
DEFAULT_RANDOM = 4  # random vectors of a run's radius that `discover`'s assessment compares the learned ones with
DIFF_RANDOM = 8  # random vectors of the same norm ranked beside the learned ones
MONITOR_ALPHA = 0.05  # the false-positive rate the monitor's decision rule aims at
# `melbo map` (melbo.jobs.layermap): a map surveys many pairs, so few directions and iterations each; open a chosen pair
# as a run (`open_pair`, R = MAP_RADIUS, discover's default) or re-run discover --method jacobian there for more.
MAP_K = 4
MAP_ITERATIONS = 8
MAP_RADIUS = "0.2x"
# radius "calibrate" (melbo.engine.calibrate): R where the non-linear part of the target block's response to random
# directions is this fraction of the linear part. 0.5 is DCT's own choice (its calibrator's target ratio): small
# enough that random directions still act mostly linearly, large enough that the non-linear responses the
# methods look for are within reach. Samples: random directions averaged (DCT uses 30); with 16, three seeds on
# SmolLM2 (blocks 8→22) gave R = 0.110x, 0.125x, 0.131x (±9%) in 5 forward passes each. Seed 0 on the other
# embedded models: Qwen2.5-Coder-0.5B 0.31x (R = 6.2), Gemma-3-270M 0.030x (R = 113): no one relative R fits all.
CALIBRATE_FRACTION = 0.5
CALIBRATE_SAMPLES = 16
# `melbo sweep` (melbo.jobs.sweep): a few short runs per R, enough to rank radii by diversity under a fluency floor.
SWEEP_RADII = ("0.05x", "0.1x", "0.2x", "0.3x", "0.5x")
SWEEP_VECTORS = 4
SWEEP_STEPS = 60
SWEEP_TOKENS = 32
FLUENCY_FACTOR = 4.0  # a point is fluent when its median perplexity is at most this × the unsteered one's
THREADS: Optional[int] = None  # torch threads; None = auto: the free cores (melbo.threads)


@dataclass
class DiscoverConfig:
    """Every setting of a discovery run; stored verbatim in config.json."""

    prompts: list[str]
    method: str = "vectors"
    n_vectors: int = 16
    source: Optional[int] = None  # default: the seed's 8 (or depth // 3 for shallow models)
    target: Optional[int] = None  # default: depth − 8 (at least source + 1)
    radius: str = "0.2x"  # absolute "4.0", × the median residual norm at the source "0.2x" (README sweep), "calibrate"
    p: float = 2.0
    q: float = 1.0
    steps: int = 150
    lr: float = 0.05
    orthogonal: str = "hard"  # hard | soft | none
    soft_weight: float = 1.0
    rank: int = 4  # adapters only
    batch_size: int = 16
    seed: int = 0
    chat: Optional[bool] = None  # None: use the chat template when the model has one
    positions: Spec = "all"  # "all", "last:K" or one index list per prompt (melbo.positions)
    max_new_tokens: int = 48
    precision: str = "auto"  # training matmuls: auto (bf16 where the hardware has bf16 units), fp32, bf16
    compile: bool = False  # torch.compile the blocks after the source: with bf16 copies no faster on CPU (docs/performance.md)
    power_iterations: int = 20  # method "jacobian" only
    contrast: Optional[str] = None  # None: plain discovery; else a contrastive form against a reference model
    contrast_weight: float = 1.0  # λ of the "penalised" contrastive form

    def __post_init__(self):
        self.radius = str(self.radius)
        self.positions = Positions.parse(self.positions).spec  # checked once, kept as config.json records it

    @classmethod
    def build(cls, prompts: list[str], **settings) -> "DiscoverConfig":
        """A config from keyword settings, naming an unknown one (with the closest known name) as one line."""
        import difflib
        from dataclasses import fields

        from melbo.errors import MelboError

        known = [f.name for f in fields(cls) if f.name != "prompts"]
        for name in settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(known)}"
                raise MelboError(f"unknown setting {name!r}: {hint}")
        return cls(prompts=prompts, **settings)


DEFAULTS = DiscoverConfig(prompts=[])

# `melbo serve` (melbo.server): local by default; another host needs --host plus a token. The bounds keep one
# request from holding the CPU for minutes (SmolLM2 generates ~25 tokens/s for one row on an idle core here, and
# streaming runs at 0.83-0.92x that: benchmarks/serve_stream.py).
SERVE_HOST = "127.0.0.1"
SERVE_PORT = 8765
SERVE_MAX_PROMPT_CHARS = 2000  # a prompt, or a whole chat history
SERVE_MAX_NEW_TOKENS = 256
SERVE_MAX_COLUMNS = 4  # perturbations streamed side by side in one request (plus unsteered and random)
SERVE_MAX_SCALE = 50.0  # |scale|: far past where any model stays fluent
SERVE_MAX_WAITING = 16  # requests in line at once; more are told the server is busy
