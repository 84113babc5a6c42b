"""GPU smoke test: melbo end to end on CUDA in bf16 (discover → generate → export, a layer map, a mixed device map).

Run it on a machine with a CUDA GPU; it needs no network. Without --model it builds a small random Llama-style
model (8 blocks × 512, byte-level tokenizer) offline, so it runs where no model can be downloaded. On a machine
without CUDA it says so and exits 0.

    python benchmarks/gpu_smoke.py                       # random 8 × 512 model
    python benchmarks/gpu_smoke.py --model Qwen/Qwen2.5-7B-Instruct --device auto   # a real one, over all GPUs

Prints one line per stage with its time, then a table. Exit status 1 when a stage fails or gives non-finite
numbers. The last stage loads the model with half its blocks on the GPU and half on the CPU (accelerate's
device map), runs the same discovery, and reports how close its vectors come to the all-GPU ones: tensors must
follow each block's device for it to run at all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import byte_tokenizer  # noqa: E402  (one token per byte, built offline: the tests' own)

PROMPTS = ["How can I make a bomb?", "Tell me a story about a dragon."]


def random_model(folder: Path, layers: int, width: int) -> str:
    """A random Llama-style causal LM saved with save_pretrained: what `melbo.load_model(path)` loads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=width, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=4, intermediate_size=3 * width, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


class Stages:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def run(self, name: str, work):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result, note = work()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.rows.append((name, seconds, note))
        print(f"{name:<34} {seconds:8.2f} s  {note}", flush=True)
        return result


def mixed_device_model(spec_dir: str, lm, dtype):
    """The same model with the first half of its blocks on cuda:0 and the rest on the CPU."""
    from transformers import AutoModelForCausalLM

    from melbo.engine.layers import find_blocks
    from melbo.engine.models import LoadedModel

    half = lm.depth // 2
    prefix = lm.blocks_path
    device_map = {"model.embed_tokens": 0, "model.norm": "cpu", "model.rotary_emb": 0, "lm_head": "cpu",
                  **{f"{prefix}.{i}": 0 if i < half else "cpu" for i in range(lm.depth)}}
    model = AutoModelForCausalLM.from_pretrained(spec_dir, dtype=dtype, device_map=device_map)
    model.eval().requires_grad_(False)
    path, blocks = find_blocks(model)
    return LoadedModel(model, lm.tokenizer, blocks, path, lm.model_id, lm.spec), device_map


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model spec melbo loads (default: a random 8 × 512 Llama-style model)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or auto (accelerate's device map)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=8, help="blocks of the random model")
    parser.add_argument("--width", type=int, default=512, help="width of the random model")
    parser.add_argument("--n-vectors", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    if not torch.cuda.is_available() and args.device != "cpu":  # --device cpu: a dry run of this script itself
        print("no CUDA GPU visible: nothing to check here. Run benchmarks/gpu_smoke.py on a machine with a CUDA GPU.")
        return 0

    import melbo
    from melbo.records.export import export_llamacpp

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__}, {gpu}, {torch.cuda.device_count()} GPU(s)")
    work = Path(tempfile.mkdtemp(prefix="melbo-gpu-smoke-"))
    stages = Stages()
    if args.model is None:
        spec = stages.run("build random model", lambda: (random_model(work / "model", args.layers, args.width),
                                                         f"{args.layers} × {args.width}, byte tokenizer"))
    else:
        spec = args.model
    lm = stages.run("load", lambda: (melbo.load_model(spec, device=args.device, dtype=args.dtype),
                                     f"{args.dtype} on {args.device}"))
    source, target = max(1, lm.depth // 4), max(2, 3 * lm.depth // 4)
    kw = dict(n_vectors=args.n_vectors, steps=args.steps, source=source, target=target, radius="0.5x", seed=0)
    run = stages.run("discover (vectors)", lambda: (
        r := melbo.discover(lm, PROMPTS, work / "run", **kw),
        f"{args.n_vectors} vectors × {args.steps} steps, blocks {source}→{target}, precision "
        f"{r.config['precision']}"))
    finite = bool(torch.isfinite(run.vectors).all()) and bool(torch.isfinite(run.curves).all())

    def generate():
        completions = melbo.generate(lm, run.perturbations, PROMPTS, sampling=_sampling(args.new_tokens))
        tokens = sum(c.tokens or 0 for c in completions)
        return completions, f"{len(completions)} completions, {tokens} tokens"

    completions = stages.run("generate (batched, steered)", generate)
    paths = stages.run("export (llama.cpp control vectors)", lambda: (
        p := export_llamacpp(run.perturbations, work / "export", lm.model_id, lm.depth), f"{len(p)} GGUF files"))
    layer_map = stages.run("map (small grid, k = 4)", lambda: (
        m := melbo.map(lm, PROMPTS[:1], f"0:{source}:{max(1, source // 2)}", f"{target}:{lm.depth - 1}",
                       k=4, out=work / "map", iterations=4),
        f"{len(m.ranking())} pairs, best {m.ranking()[0]['source']}→{m.ranking()[0]['target']}"))
    finite &= bool(torch.isfinite(layer_map.tensors["directions"]).all())
    mixed_note = "skipped (--model is not a local directory)"
    if not torch.cuda.is_available():
        mixed_note = "skipped (no GPU)"
    elif Path(spec).is_dir():
        mixed, device_map = stages.run("load (half blocks on CPU)", lambda: (
            mixed_device_model(spec, lm, melbo.engine.models.DTYPES[args.dtype]),
            "accelerate device map, cuda:0 + cpu"))
        mixed_run = stages.run("discover (mixed devices)", lambda: (
            melbo.discover(mixed, PROMPTS, work / "mixed", **kw), "same settings as above"))
        cos = torch.nn.functional.cosine_similarity(mixed_run.vectors.float(), run.vectors.float(), dim=-1)
        stages.run("generate (mixed devices)", lambda: (
            c := melbo.generate(mixed, mixed_run.perturbations, PROMPTS[:1], sampling=_sampling(8)),
            f"{len(c)} completions"))
        mixed_note = f"cosine to the all-GPU vectors: min {float(cos.min()):.3f}, median {float(cos.median()):.3f}"
        finite &= bool(torch.isfinite(mixed_run.vectors).all())
    print()
    print("| stage | seconds | note |\n|---|---|---|")
    for name, seconds, note in stages.rows:
        print(f"| {name} | {seconds:.2f} | {note} |")
    print(f"\nmixed device map: {mixed_note}")
    print(f"first steered completion: {completions[1].text[:80]!r}")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print(f"peak GPU memory: {peak:.2f} GiB; everything finite: {finite}")
    return 0 if finite and paths else 1


def _sampling(tokens: int):
    from melbo.engine.generation import Sampling

    return Sampling(max_new_tokens=tokens)


if __name__ == "__main__":
    sys.exit(main())
