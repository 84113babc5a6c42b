"""Memory each model size needs for melbo, computed from the models' published configs (no weights loaded).

    python benchmarks/memory_table.py [--tokens 64] [--rows 16] [--context 512]

Columns (bf16 unless said):
- weights: parameters × 2 bytes (fp32: × 4), embeddings and an untied LM head included;
- act / vector-step: what the backward pass keeps for ONE row (one vector on one prompt of --tokens tokens)
  across the blocks between source and target (half the depth, the default's span), as an estimate of
  ≈ (10·d + 4·I) values per token per block (block input, norms, q/k/v/attention output, the MLP's gate, up and
  product); training N vectors on P prompts needs N·P times this;
- KV / row: the generation cache for one row of --context tokens, 2 · layers · kv_heads · head_dim values per token;
- generate: weights + --rows rows of KV cache, the batch melbo generates steered completions in.
Estimates, not measurements: framework workspace, the unsteered replay cache and fragmentation come on top.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Config:
    name: str
    layers: int
    width: int  # d
    intermediate: int  # I
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def params(self) -> int:
        d, i, hd = self.width, self.intermediate, self.head_dim
        attention = d * self.heads * hd * 2 + d * self.kv_heads * hd * 2  # q, o; k, v
        if self.qkv_bias:
            attention += self.heads * hd + 2 * self.kv_heads * hd
        block = attention + 3 * d * i + 2 * d  # gate/up/down, two norms
        return self.vocab * d * (1 if self.tied else 2) + self.layers * block + d


# From each model's config.json on the Hugging Face hub.
CONFIGS = [
    Config("SmolLM2-135M (default)", 30, 576, 1536, 9, 3, 49152, True),
    Config("Qwen2.5-0.5B", 24, 896, 4864, 14, 2, 151936, True, True),
    Config("Qwen2.5-7B", 28, 3584, 18944, 28, 4, 152064, False, True),
    Config("Llama-3.1-8B", 32, 4096, 14336, 32, 8, 128256, False),
    Config("Qwen2.5-14B", 48, 5120, 13824, 40, 8, 152064, False, True),
    Config("Qwen2.5-32B", 64, 5120, 27648, 40, 8, 152064, False, True),
    Config("Llama-3.1-70B", 80, 8192, 28672, 64, 8, 128256, False),
    Config("Qwen2.5-72B", 80, 8192, 29568, 64, 8, 152064, False, True),
]


def fmt(gib: float) -> str:
    return f"{gib:.2f}" if gib < 10 else f"{gib:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="prompt tokens per row (training)")
    parser.add_argument("--rows", type=int, default=16, help="rows generated together")
    parser.add_argument("--context", type=int, default=512, help="tokens per generated row (prompt + new)")
    args = parser.parse_args()
    print(f"| model | params | weights bf16 GiB | weights fp32 GiB | act / vector-step MiB ({args.tokens} tok, "
          f"L/2 blocks) | KV / row MiB ({args.context} tok) | generate {args.rows} rows GiB |")
    print("|---|---|---|---|---|---|---|")
    for c in CONFIGS:
        params = c.params()
        weights = params * 2 / GIB
        per_token_block = 10 * c.width + 4 * c.intermediate
        activations = per_token_block * args.tokens * (c.layers // 2) * 2 / 2**20
        kv_row = 2 * c.layers * c.kv_heads * c.head_dim * args.context * 2 / 2**20
        generate = weights + args.rows * kv_row / 1024
        print(f"| {c.name} | {params / 1e9:.2f} B | {fmt(weights)} | {fmt(params * 4 / GIB)} | {activations:.0f} | "
              f"{kv_row:.0f} | {fmt(generate)} |")


if __name__ == "__main__":
    main()
