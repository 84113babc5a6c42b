"""The fast path (replayed prefix, forward stopped at the target) computes exactly the seed's objective."""

import pytest
import torch
from conftest import tiny_lm

from melbo.engine.intervention import add_lora, add_to_block_output
from melbo.engine.methods import Setting, SteeringAdapterMethod, SteeringVectorMethod
from melbo.engine.objective import TargetProbe, melbo_objective
from melbo.engine.prompts import batch_from_ids, token_mask

S, T = 1, 2
LENGTHS = (5, 9, 7)


def prompts_ids():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def reference_objective(lm, ids, perturb, p, q, positions=None):
    """Each prompt alone, full forward with output_hidden_states (h_t = hidden_states[t + 1])."""
    total = 0.0
    for i, prompt in enumerate(ids):
        x = torch.tensor([prompt])
        clean = lm.model(x, output_hidden_states=True).hidden_states[T + 1][0]
        with perturb():
            steered = lm.model(x, output_hidden_states=True).hidden_states[T + 1][0]
        dist = (steered - clean).norm(dim=-1)
        keep = positions[i] if positions else range(len(prompt))
        total += float(sum(dist[k] ** p for k in keep)) ** (1 / q)
    return total


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2", "qwen3"])
@pytest.mark.parametrize("p,q", [(2, 1), (2, 2), (4, 1), (4, 4)])
def test_fast_vector_objective_equals_full_forward(arch, p, q):
    lm = tiny_lm(arch)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    method = SteeringVectorMethod(Setting(source=S, radius=3.0, width=lm.width, orthogonal="none"))
    params = method.init(3, torch.Generator().manual_seed(0), None)
    probe = TargetProbe(lm, batch, S, T, method.replay_upto(S))
    z = probe(3, lambda: method.perturb(lm, params, len(batch)))
    fast = melbo_objective(z, probe.z0, batch.token_mask, p, q)
    for k in range(3):
        theta = params["vectors"][k].detach()
        ref = reference_objective(lm, ids, lambda: add_to_block_output(lm, S, theta), p, q)
        assert fast[k].item() == pytest.approx(ref, rel=2e-4)
    fast.sum().backward()  # padded rows must not poison the gradient
    assert torch.isfinite(params["vectors"].grad).all() and params["vectors"].grad.abs().sum() > 0


def test_fast_objective_with_explicit_token_positions():
    lm = tiny_lm("llama")
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    wanted = [[-1, 0], [3], [-2, -1]]
    batch.token_mask = token_mask(batch, wanted)
    positions = [[k % n for k in w] for w, n in zip(wanted, LENGTHS)]
    theta = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 2
    probe = TargetProbe(lm, batch, S, T, S)
    z = probe(1, lambda: add_to_block_output(lm, S, theta.expand(len(batch), -1)))
    fast = melbo_objective(z, probe.z0, batch.token_mask, 2, 1)
    ref = reference_objective(lm, ids, lambda: add_to_block_output(lm, S, theta), 2, 1, positions)
    assert fast.item() == pytest.approx(ref, rel=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_adapter_objective_equals_full_forward(arch):
    lm = tiny_lm(arch)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    method = SteeringAdapterMethod.create(lm, Setting(source=S, radius=2.0, width=lm.width, rank=2,
                                                          orthogonal="none"))
    params = method.init(2, torch.Generator().manual_seed(0), None)
    probe = TargetProbe(lm, batch, S, T, method.replay_upto(S))
    z = probe(2, lambda: method.perturb(lm, params, len(batch)))
    fast = melbo_objective(z, probe.z0, batch.token_mask, 2, 1)
    for k in range(2):
        a, b = params["a"][k : k + 1].detach(), params["b"][k : k + 1].detach()
        ref = reference_objective(lm, ids, lambda: add_lora(lm, S, a, b, 2.0), 2, 1)
        assert fast[k].item() == pytest.approx(ref, rel=2e-4)


def test_objective_formula_on_known_numbers():
    z0 = torch.zeros(1, 3, 2)
    z = torch.tensor([[[[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]]])  # distances 5, 1, 10
    mask = torch.tensor([[True, True, False]])
    assert melbo_objective(z, z0, mask, p=2, q=1).item() == pytest.approx(26.0)
    assert melbo_objective(z, z0, mask, p=4, q=4).item() == pytest.approx(626 ** 0.25)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3"])
def test_slice_through_every_block_equals_full_forward_with_per_layer_attention(arch):
    # Block 0 → the last but one (the last hidden state HF returns is after the final norm): gemma3 alternates
    # sliding and full attention, so the slice's blocks each get their own mask.
    lm = tiny_lm(arch)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    last = len(lm.blocks) - 2
    theta = torch.randn(lm.width, generator=torch.Generator().manual_seed(1)) * 2
    probe = TargetProbe(lm, batch, 0, last, 0)
    assert probe.slice is not None and len(probe.slice.blocks) == last >= 2
    z = probe(2, lambda: add_to_block_output(lm, 0, torch.stack([theta, -theta]).repeat_interleave(len(batch), 0)))
    for k, sign in enumerate((1, -1)):
        for i, prompt in enumerate(ids):
            x = torch.tensor([prompt])
            with add_to_block_output(lm, 0, sign * theta):
                full = lm.model(x, output_hidden_states=True).hidden_states[last + 1][0]
            real = batch.token_mask[i]
            torch.testing.assert_close(z[k, i][real], full, rtol=1e-4, atol=1e-4)


def test_bf16_probe_uses_copies_and_leaves_the_model_fp32():
    lm = tiny_lm("llama")
    batch = batch_from_ids(prompts_ids())
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    fp32, bf16 = TargetProbe(lm, batch, 0, 3, 0, "fp32"), TargetProbe(lm, batch, 0, 3, 0, "bf16")
    assert all(next(b.parameters()).dtype == torch.bfloat16 for b in bf16.slice.blocks)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    theta = torch.randn(3, lm.width, generator=torch.Generator().manual_seed(2)) * 3
    delta = theta.repeat_interleave(len(batch), 0)
    values = [melbo_objective(p(3, lambda: add_to_block_output(lm, 0, delta)), p.z0, batch.token_mask)
              for p in (fp32, bf16, bf16)]
    torch.testing.assert_close(values[1], values[2], rtol=0, atol=0)  # deterministic
    torch.testing.assert_close(values[1], values[0], rtol=0.1, atol=0)  # bf16 rounding, not another function
    assert melbo_objective(bf16(1, lambda: torch.no_grad()), bf16.z0, batch.token_mask).item() == 0.0


@pytest.mark.slow  # torch.compile takes seconds even for a tiny model
def test_compiled_slice_equals_the_eager_one_and_leaves_hooked_blocks_eager():
    lm = tiny_lm("llama")
    batch = batch_from_ids(prompts_ids())
    method = SteeringAdapterMethod.create(lm, Setting(source=1, radius=2.0, width=lm.width, rank=2, orthogonal="none"))
    params = method.init(2, torch.Generator().manual_seed(0), None)
    eager = TargetProbe(lm, batch, 1, 3, method.replay_upto(1))
    compiled = TargetProbe(lm, batch, 1, 3, method.replay_upto(1), compile=True)
    assert compiled.slice.hooked == 1  # block 1 holds the adapter's hook: it runs eagerly
    assert compiled.slice._tail is not eager.slice._tail  # blocks 2..3 go through torch.compile
    for _ in range(2):  # the adapter's hooks are new on every call: no recompilation, the same numbers
        grads = []
        for probe in (eager, compiled):
            params["a"].grad = None
            z = probe(2, lambda: method.perturb(lm, params, len(batch)))
            melbo_objective(z, probe.z0, batch.token_mask).sum().backward()
            grads.append((z.detach(), params["a"].grad.clone()))
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.z0, eager.z0, rtol=1e-4, atol=1e-4)


def test_compiling_keeps_inductors_kernels_in_melbos_cache(monkeypatch, tmp_path):
    import os

    from melbo.engine.blockslice import _compiled

    monkeypatch.setenv("MELBO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    _compiled(lambda x: x)  # compiling itself waits for the first call
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    _compiled(lambda x: x)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's choice stands
