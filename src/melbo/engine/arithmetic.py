"""Vector arithmetic on a run's steering vectors, and random baselines of matched norm.

Expressions are parsed (never evaluated) with `ast`: numbers, `v<index>`, + − * and parentheses, e.g.
"v9 - 0.5*v22", "-1.5*v3", "(v1 + v2) * 0.5".
"""

from __future__ import annotations

import ast
import math

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.engine.intervention import SteeringVectors


MAX_NODES = 256  # numbers, vectors and operators in one expression: bounds the parser's and _eval's recursion


def evaluate(expr: str, vectors: Tensor) -> Tensor:
    """The vector an expression over `vectors` ([N, d]) denotes."""
    tree = _parse(expr)
    value = _eval(tree.body, vectors, expr)
    if not isinstance(value, Tensor):
        raise MelboError(f"expression {expr!r} names no vector: use e.g. \"2*v3\"")
    if not torch.isfinite(value).all():
        raise MelboError(f"expression {_short(expr)} overflows to a non-finite vector: use smaller coefficients")
    return value


def _parse(expr: str) -> ast.Expression:
    too_long = MelboError(f"expression {_short(expr)} is too long: use at most {MAX_NODES} numbers, vectors "
                          "and operators")
    if len(expr) > 16 * MAX_NODES:  # checked before parsing: CPython's parser itself recurses
        raise too_long
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise MelboError(f"malformed expression {_short(expr)}: use e.g. \"v9 - 0.5*v22\"") from None
    except (RecursionError, MemoryError):
        raise too_long from None
    if sum(isinstance(node, ast.expr) for node in ast.walk(tree)) > MAX_NODES:
        raise too_long
    return tree


def _short(expr: str) -> str:
    return repr(expr) if len(expr) <= 80 else repr(expr[:77] + "...")


def _eval(node: ast.AST, vectors: Tensor, expr: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        if not math.isfinite(node.value):  # 1e400 parses as inf
            raise MelboError(f"a number in {_short(expr)} is too large for a float: use a smaller coefficient")
        return float(node.value)
    if isinstance(node, ast.Name) and node.id[:1] == "v" and node.id[1:].isdigit():
        index = int(node.id[1:])
        if index >= vectors.shape[0]:
            raise MelboError(f"{node.id} is out of range in {expr!r}: this run has v0..v{vectors.shape[0] - 1}")
        return vectors[index]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand, vectors, expr)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _eval(node.left, vectors, expr), _eval(node.right, vectors, expr)
        if isinstance(node.op, ast.Mult):
            if isinstance(left, Tensor) and isinstance(right, Tensor):
                raise MelboError(f"{expr!r} multiplies two vectors: scale vectors by numbers only")
            return left * right
        if isinstance(left, Tensor) != isinstance(right, Tensor):
            raise MelboError(f"{expr!r} adds a number to a vector: add vectors to vectors only")
        return left + right if isinstance(node.op, ast.Add) else left - right
    raise MelboError(f"malformed expression {expr!r}: only numbers, v<index>, +, -, * and parentheses are allowed")


def expressions(exprs: list[str], vectors: SteeringVectors) -> SteeringVectors:
    return SteeringVectors(torch.stack([evaluate(e, vectors.vectors) for e in exprs]), vectors.layer)


def random_vectors(k: int, width: int, radius: float, layer: int, seed: int = 0) -> SteeringVectors:
    """k directions uniform on the sphere, each of norm `radius`: the seed's random baseline."""
    if k <= 0:
        raise MelboError(f"--random must be ≥ 1, got {k}")
    x = torch.randn(k, width, generator=torch.Generator().manual_seed(10_007 + seed))
    return SteeringVectors(x / x.norm(dim=-1, keepdim=True) * radius, layer)


def perturbation_set(run, indices: list[int] | None, exprs: list[str], random: int, seed: int = 0):
    """The perturbations `melbo generate` applies: selected vectors, expressions, then random baselines.

    Returns (perturbations, labels). Without --vectors, all vectors are used unless expressions are given.
    """
    base = run.perturbations
    if base is None:
        raise MelboError(f"run {run.path} is not finished: resume it with `melbo discover --resume {run.path}`")
    if indices is None:
        indices = [] if exprs else list(range(len(base)))
    for i in indices:
        if not 0 <= i < len(base):
            raise MelboError(f"vector index {i} is out of range: this run has 0..{len(base) - 1}")
    if (exprs and not base.supports_arithmetic) or (random and not base.supports_random_baseline):
        raise MelboError(f"--expr and --random work on steering vectors; this run holds {base.KIND}")
    if not exprs and not random:
        return base.select(indices), [f"v{i}" for i in indices]
    parts = [base.vectors[indices]]
    labels = [f"v{i}" for i in indices]
    if exprs:
        parts.append(expressions(exprs, base).vectors)
        labels += exprs
    if random:
        radius = run.config.radius
        parts.append(random_vectors(random, base.vectors.shape[1], radius, base.layer, seed).vectors)
        labels += [f"random{k}" for k in range(random)]
    return SteeringVectors(torch.cat(parts), base.layer), labels
