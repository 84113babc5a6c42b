"""Layer maps: the top-k Jacobian singular values and directions of every (source, target) block pair.

`layer_map(lm, prompts, sources, targets, k, out)` (exported as `melbo.map`) runs the Jacobian power iteration
(`melbo.engine.methods.jacobian.jacobian_directions`) once per pair with source < target, and writes a map directory:

    map.json             settings, model identity, status
    map.safetensors      singular_values [S, T, k] (NaN where source ≥ target), directions [S, T, k, d],
                         history [S, T, k, iterations + 1], norms [S, T, 2] (median residual norm at source, target)
    ranking.json         the pairs, best first, by relative gain σ₁ / √n · ‖h_source‖ / ‖h_target‖ (n: the tokens
                         the Jacobian covers, so the gain is per token)
    map.png              heatmap of the relative gain; report.html shows it with the ranking
    pairs/               one checkpoint file per finished pair, while the map is unfinished

The relative gain ranks pairs: σ₁ alone grows with the target's norm, which grows with depth; the gain says how
far a perturbation of a given relative size at the source moves the target relative to its own size.
A pair's result depends only on (seed, source, target): the same bitwise on CPU whether the pairs run serially,
resumed after an interruption, or on Ray workers in any order (`melbo.engine.distributed`).
`open_pair(map_dir, source, target, out)` turns one pair's directions into an ordinary jacobian run directory.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from melbo import __version__
from melbo.checks import check_count_bound, check_whole
from melbo.engine.distributed import RayPool
from melbo.errors import MelboError
from melbo.io.files import check_output_dir, load_tensors, make_output_dir, save_tensors, write_json
from melbo.engine.intervention import SteeringVectors
from melbo.engine.methods.jacobian import jacobian_directions
from melbo.engine.models import LoadedModel
from melbo.engine.objective import TargetProbe, residual_norm
from melbo.engine.prompts import PromptBatch, check_prompt_list, encode
from melbo.io.runconfig import MapConfig, MapSettings, ModelRecord, RunConfig
from melbo.engine.runner import numeric_radius
from melbo.positions import Positions, Spec
from melbo.settings import DEFAULTS, MAP_ITERATIONS, MAP_K, MAP_RADIUS, DiscoverConfig
from melbo.engine.store import LAYER_MAP, Run

TENSORS = "map.safetensors"
RANKING = "ranking.json"
HEATMAP = "map.png"
PAIRS = "pairs"

Progress = Callable[[dict], None]
Layers = Union[Sequence[int], str, None]


@dataclass
class PairResult:
    """One pair's top-k directions. `worker`: who computed it (a process id), for progress only."""

    source: int
    target: int
    singular_values: Tensor  # [k]
    directions: Tensor  # [k, d], unit rows
    history: Tensor  # [k, iterations + 1], Rayleigh quotients σ² per iteration
    norms: Tensor  # [2]: median residual norm at source and at target
    seconds: float = 0.0
    worker: Optional[int] = field(default=None, compare=False)

    @property
    def gain(self) -> float:
        return float(self.singular_values[0]) * float(self.norms[0]) / float(self.norms[1])

    def tensors(self) -> dict[str, Tensor]:
        return {"singular_values": self.singular_values, "directions": self.directions, "history": self.history,
                "norms": self.norms}


# ------------------------------------------------------------------------------------------------ one pair
def pair_seed(seed: int, source: int, target: int) -> int:
    """The pair's own random start: independent of which pairs ran before it, or where."""
    return (seed * 1_000_003 + source * 1_009 + target) % (2**63)


def compute_pair(lm: LoadedModel, batch: PromptBatch, source: int, target: int, settings: MapSettings) -> PairResult:
    """Top-k right singular vectors of ∂Z_target/∂θ_source, as `melbo.engine.methods.jacobian` computes them."""
    start = time.perf_counter()
    probe = TargetProbe(lm, batch, source, target, source, "fp32")  # finite differences need fp32
    norms = torch.tensor([residual_norm(lm, batch, source), residual_norm(lm, batch, target)])
    generator = torch.Generator().manual_seed(pair_seed(settings.seed, source, target))
    directions, sigma2, history = jacobian_directions(probe, settings.k, settings.iterations, generator,
                                                      eps=0.01 * float(norms[0]))
    return PairResult(source, target, sigma2.clamp_min(0).sqrt(), directions, history, norms,
                      time.perf_counter() - start)


def encode_for(lm: LoadedModel, settings: MapSettings) -> PromptBatch:
    return encode(lm, settings.prompts, settings.chat, settings.positions)


def pair_task(lm: LoadedModel, memo: dict, item: tuple[MapSettings, int, int]) -> PairResult:
    """One (settings, source, target) item on a Ray worker (`RayPool.run`): the prompts tokenised once per map."""
    settings, source, target = item
    key = repr(settings)
    if key not in memo:
        memo[key] = encode_for(lm, settings)
    result = compute_pair(lm, memo[key], source, target, settings)
    result.worker = os.getpid()
    return result


# ------------------------------------------------------------------------------------------------ the grid
def parse_layers(spec: Layers, depth: int, what: str) -> list[int]:
    """'4:20' (both ends included), '4:20:2', '3,7,11', 'all', or a list of ints → sorted block indices."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(depth))
    if isinstance(spec, str):
        text = spec.strip()
        try:
            if ":" in text:
                parts = [int(p) for p in text.split(":")]
                if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] <= 0):
                    raise ValueError
                layers = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
            else:
                layers = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            raise MelboError(f"--{what} {spec!r} is not a block range: use e.g. 4:20 (both ends included), "
                             "4:20:2, 3,7,11 or all") from None
    else:
        if isinstance(spec, (bytes, bytearray)) or not hasattr(spec, "__iter__"):
            raise MelboError(f"{what} must be a list of block indices or a range like '4:20', got {spec!r}")
        layers = [check_whole(what, x) for x in spec]
    if not layers:
        raise MelboError(f"--{what} {spec!r} holds no blocks: use e.g. 4:20 (both ends included)")
    bad = [x for x in layers if not 0 <= x < depth]
    if bad:
        raise MelboError(f"--{what} block {bad[0]} is out of range: this model has blocks 0..{depth - 1}")
    return sorted(set(layers))


def default_layers(depth: int, count: int = 8) -> list[int]:
    """Without --sources/--targets/--layers: `count` evenly spaced blocks (all of them for shallow models)."""
    return sorted({round(i * (depth - 1) / (count - 1)) for i in range(count)}) if depth > count else list(range(depth))


def make_settings(lm: LoadedModel, prompts: Sequence[str], sources: Layers, targets: Layers, k: int,
                  iterations: int, seed: int, chat: Optional[bool], positions: Spec | Positions) -> MapSettings:
    """Validated settings; an empty grid (every source ≥ every target) is a one-line error."""
    prompts = check_prompt_list(prompts)
    for name, value in (("k", k), ("iterations", iterations), ("seed", seed)):
        check_whole(name, value)
    if k < 1 or iterations < 1:
        raise MelboError(f"k and iterations must be ≥ 1, got k={k}, iterations={iterations}")
    check_count_bound("iterations", iterations)
    if k > lm.width:
        raise MelboError(f"k = {k} directions do not fit in width {lm.width}: ask for fewer")
    if chat is not None and not isinstance(chat, bool):
        raise MelboError(f"chat must be true, false or None, got {chat!r}")
    both_default = sources is None and targets is None
    source_list = default_layers(lm.depth) if both_default else parse_layers(sources, lm.depth, "sources")
    target_list = default_layers(lm.depth) if both_default else parse_layers(targets, lm.depth, "targets")
    positions = Positions.parse(positions)
    positions.check_count(len(prompts))
    settings = MapSettings(list(prompts), source_list, target_list, k, iterations, seed, chat, positions.spec)
    if not settings.pairs:
        raise MelboError(f"no pair has source < target (sources {_span(source_list)}, targets {_span(target_list)}): "
                         "give sources that come before the targets")
    return settings


def _span(layers: list[int]) -> str:
    return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])


# ------------------------------------------------------------------------------------------------ the map
def layer_map(
    lm: LoadedModel,
    prompts: Sequence[str],
    sources: Layers = None,
    targets: Layers = None,
    k: int = MAP_K,
    out: str | Path | None = None,
    *,
    iterations: int = MAP_ITERATIONS,
    seed: int = 0,
    chat: Optional[bool] = None,
    positions: Spec = DEFAULTS.positions,
    resume: bool = False,
    workers: Optional[int] = None,
    ray_address: Optional[str] = None,
    progress: Optional[Progress] = None,
) -> "LayerMap":
    """Map every (source, target) pair with source < target; write the map directory (module docstring).

    `sources`/`targets`: '4:20' (both ends included), '4:20:2', '3,7,11', 'all' or a list; neither given: 8
    evenly spaced blocks. `workers` or `ray_address` runs the pairs on Ray actors (`melbo.engine.distributed`), else
    serially here. `resume=True` continues an interrupted map in `out` (its settings must match).
    `progress` receives {"stage": "pair", "done", "total", "source", "target", "seconds", "worker"} per finished
    pair, and {"stage": "start", "total", "done"} first.
    """
    settings = make_settings(lm, prompts, sources, targets, k, iterations, seed, chat, positions)
    path = Path(out) if out is not None else Path("runs") / f"map-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    check_output_dir(path)
    executor = None
    if workers is not None or ray_address is not None:
        executor = RayPool.check(workers, ray_address)  # fail fast, before any file is written
    batch = encode_for(lm, settings)  # validates prompts and positions before any file is written
    _prepare(path, lm, settings, resume, int(batch.token_mask.sum()))
    if MapConfig.load(path).complete:  # --resume of a finished map: nothing to do
        return LayerMap.load(path)
    done = _finished_pairs(path)
    pending = [p for p in settings.pairs if p not in done]
    total = len(settings.pairs)
    if progress:
        progress({"stage": "start", "total": total, "done": total - len(pending)})
    count = [total - len(pending)]

    def finished(result: PairResult) -> None:
        save_tensors(_pair_file(path, result.source, result.target), result.tensors(),
                     {"seconds": repr(result.seconds)})
        count[0] += 1
        if progress:
            progress({"stage": "pair", "done": count[0], "total": total, "source": result.source,
                      "target": result.target, "seconds": result.seconds, "worker": result.worker})

    if executor is not None:
        executor.run(lm, pair_task, [(settings, s, t) for s, t in pending], finished)
    else:
        for s, t in pending:
            finished(compute_pair(lm, batch, s, t, settings))
    return _assemble(path, settings)


def _prepare(path: Path, lm: LoadedModel, settings: MapSettings, resume: bool, tokens: int) -> None:
    """A new map directory, or (resume) the same map's: the model and settings must match."""
    if (path / LAYER_MAP).exists():
        if not resume:
            raise MelboError(f"{path} already holds a layer map: use --resume to continue it, or another --out")
        stored = MapConfig.load(path)
        if stored.model.id != lm.model_id:
            raise MelboError(f"{path} was mapped with model {stored.model.id}, not {lm.model_id}: "
                             "load that model or map into another --out")
        if stored.model.system != lm.system:
            raise MelboError(f"{path} was mapped with system prompt {stored.model.system!r}, not {lm.system!r}: "
                             "give the same --system-prompt, or map into another --out")
        if _jsonable(stored.settings) != _jsonable(settings):
            raise MelboError(f"{path} holds a map with other settings: give the same ones, or map into another --out")
        return
    if path.exists() and any(path.iterdir()):
        raise MelboError(f"{path} already exists and is not empty: choose another --out")
    make_output_dir(path)
    import transformers

    MapConfig(settings, ModelRecord.from_dict(lm.describe()), "running", len(settings.pairs), tokens, __version__,
              _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              {"torch": torch.__version__, "transformers": transformers.__version__,
               "python": platform.python_version()}).save(path)


def _jsonable(settings: MapSettings) -> dict:
    return asdict(settings)


def _pair_file(path: Path, source: int, target: int) -> Path:
    return path / PAIRS / f"s{source}-t{target}.safetensors"


def _finished_pairs(path: Path) -> set[tuple[int, int]]:
    folder = path / PAIRS
    folder.mkdir(exist_ok=True)
    done = set()
    for file in folder.glob("s*-t*.safetensors"):
        s, t = file.stem[1:].split("-t")
        done.add((int(s), int(t)))
    return done


def _assemble(path: Path, settings: MapSettings) -> "LayerMap":
    """The finished pairs as one tensor file, the ranking, the heatmap and the report; checkpoints removed."""
    S, T, k = len(settings.sources), len(settings.targets), settings.k
    first = load_tensors(_pair_file(path, *settings.pairs[0]))
    d = first["directions"].shape[-1]
    tensors = {"singular_values": torch.full((S, T, k), math.nan), "directions": torch.zeros(S, T, k, d),
               "history": torch.full((S, T, k, settings.iterations + 1), math.nan),
               "norms": torch.full((S, T, 2), math.nan),
               "sources": torch.tensor(settings.sources), "targets": torch.tensor(settings.targets)}
    for s, t in settings.pairs:
        pair = load_tensors(_pair_file(path, s, t))
        i, j = settings.sources.index(s), settings.targets.index(t)
        for name in ("singular_values", "directions", "history", "norms"):
            tensors[name][i, j] = pair[name]
    save_tensors(path / TENSORS, tensors)
    result = LayerMap(path, MapConfig.load(path), tensors)
    write_json(path / RANKING, result.ranking())
    from melbo.io.plots import layer_map_figure, save_figure

    save_figure(layer_map_figure(result.gains(), settings.sources, settings.targets), path / HEATMAP)
    result.config.status = "complete"
    result.config.save(path)
    shutil.rmtree(path / PAIRS, ignore_errors=True)
    from melbo.records.report import write_report

    write_report(path)
    return result


# ------------------------------------------------------------------------------------------------ reading
@dataclass
class LayerMap:
    """A finished map directory loaded into memory."""

    path: Path
    config: MapConfig
    tensors: dict[str, Tensor]

    @classmethod
    def load(cls, path: str | Path) -> "LayerMap":
        path = Path(path)
        if not (path / LAYER_MAP).is_file():
            raise MelboError(f"{path} is not a layer map (no {LAYER_MAP}): give the directory `melbo map` wrote")
        config = MapConfig.load(path)
        if not config.complete:
            raise MelboError(f"the layer map in {path} is unfinished: continue it with `melbo map ... --resume`")
        return cls(path, config, _checked_map_tensors(path / TENSORS, config))

    @property
    def settings(self) -> MapSettings:
        return self.config.settings

    @property
    def heatmap(self) -> Path:
        return self.path / HEATMAP

    def gains(self) -> Tensor:
        """σ₁ / √tokens · ‖h_source‖ / ‖h_target‖ per pair [S, T] (NaN where source ≥ target).

        J stacks every covered token's change, so σ grows as √tokens: dividing makes the gain an RMS per token.
        """
        norms, tokens = self.tensors["norms"], self.config.tokens
        return self.tensors["singular_values"][..., 0] / math.sqrt(tokens) * norms[..., 0] / norms[..., 1]

    def ranking(self) -> list[dict]:
        """Every mapped pair, the largest relative gain first."""
        s_list, t_list = self.tensors["sources"].tolist(), self.tensors["targets"].tolist()
        gains, sigma = self.gains(), self.tensors["singular_values"]
        rows = [{"source": s, "target": t, "gain": float(gains[i, j]), "singular_values": sigma[i, j].tolist()}
                for i, s in enumerate(s_list) for j, t in enumerate(t_list) if s < t]
        rows.sort(key=lambda r: (-r["gain"], r["source"], r["target"]))
        return [{"rank": n + 1, **r} for n, r in enumerate(rows)]

    def pair(self, source: int, target: int) -> dict[str, Tensor]:
        s_list, t_list = self.tensors["sources"].tolist(), self.tensors["targets"].tolist()
        if source not in s_list or target not in t_list or source >= target:
            raise MelboError(f"pair {source}:{target} is not in this map: mapped sources {_span(s_list)}, "
                             f"targets {_span(t_list)}, with source < target")
        i, j = s_list.index(source), t_list.index(target)
        return {name: self.tensors[name][i, j] for name in ("singular_values", "directions", "history", "norms")}


def _checked_map_tensors(file: Path, config: MapConfig) -> dict[str, Tensor]:
    """map.safetensors as `_assemble` wrote it: [S, T, ...] floats over the mapped blocks, directions finite and of
    the model's width (singular values, norms and history are NaN where source ≥ target, by design)."""
    fix = f"map again into a new --out (or delete {file.name} and resume the map)"
    tensors = load_tensors(file)
    s, t, k = len(config.settings.sources), len(config.settings.targets), config.settings.k
    shapes = {"singular_values": (s, t, k), "directions": (s, t, k, config.model.width or -1), "norms": (s, t, 2)}
    for name, shape in shapes.items():
        found = tensors.get(name)
        if found is None or not found.dtype.is_floating_point:
            raise MelboError(f"{file} holds no float {name}: {fix}")
        if tuple(found.shape) != shape and not (shape[-1] == -1 and tuple(found.shape[:-1]) == shape[:-1]):
            raise MelboError(f"{file} holds {name} of shape {tuple(found.shape)}, not {shape}: {fix}")
    if not bool(torch.isfinite(tensors["directions"]).all()):
        raise MelboError(f"{file} holds NaN or infinite directions: {fix}")
    for name, blocks in (("sources", config.settings.sources), ("targets", config.settings.targets)):
        if name not in tensors or tensors[name].tolist() != blocks:
            raise MelboError(f"{file} does not hold the {name} map.json names ({blocks}): {fix}")
    return tensors


def _scaled(directions: Tensor, absolute: float, radius: str) -> Tensor:
    """The unit directions times R, refusing an R whose vectors (or their squared norms, which every layer norm
    computes) overflow float32: such a run would store infinite vectors, and steer into NaN."""
    limit = math.sqrt(torch.finfo(torch.float32).max)
    vectors = directions.float() * absolute
    if not (math.isfinite(absolute) and absolute < limit and bool(torch.isfinite(vectors).all())):
        raise MelboError(f"radius {radius} gives vectors of norm {absolute:.3g}, beyond float32's range "
                         f"(keep it under {limit:.2g}): give a smaller --radius, e.g. {MAP_RADIUS}")
    return vectors


def open_pair(map_dir: str | Path, source: int, target: int, out: str | Path,
              radius: str = MAP_RADIUS) -> Run:
    """Write one pair's directions as a finished jacobian run (vectors = directions · R) that generate, chat and
    export accept. `radius` is absolute ("4.0") or relative to the source's residual norm ("0.2x")."""
    layer_map_ = LayerMap.load(map_dir)
    check_whole("source", source)
    check_whole("target", target)
    pair = layer_map_.pair(source, target)
    norm = float(pair["norms"][0])
    absolute = numeric_radius(radius).resolve(norm)  # a number: auto and calibrate belong to discovery runs
    vectors = _scaled(pair["directions"], absolute, radius)
    s = layer_map_.settings
    cfg = DiscoverConfig(prompts=s.prompts, method="jacobian", n_vectors=s.k, source=source, target=target,
                         radius=str(radius), seed=s.seed, chat=s.chat, positions=s.positions, precision="fp32",
                         power_iterations=s.iterations)
    config = RunConfig(
        settings=cfg, model=layer_map_.config.model,
        source=source, target=target, melbo_version=__version__,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        versions=layer_map_.config.versions, radius=absolute, radius_relative=absolute / norm,
        residual_norm=norm, precision="fp32", layer_map=str(Path(map_dir).resolve()),
        record={"singular_values": pair["singular_values"].tolist(), "finite_difference_eps": 0.01 * norm},
    )
    # open-pair may write into an empty folder, which a failure then leaves empty (a bad type: Run.create says so)
    empty = isinstance(out, (str, os.PathLike)) and Path(out).is_dir()
    run = Run.create(out, config)  # refuses a folder that holds anything
    try:
        run.save_result(SteeringVectors(vectors, source), pair["history"])
    except BaseException:  # a full disk, say: a pair opened halfway is no run (and discover cannot resume it)
        shutil.rmtree(run.path, ignore_errors=True)
        if empty:
            run.path.mkdir()
        raise
    return run
