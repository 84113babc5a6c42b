"""Contrastive objectives: exact against a hand computation, zero for identical models, runs and resume."""

import pytest
import torch
from conftest import tiny_lm
from test_objective import prompts_ids

from melbo.engine.contrastive import ContrastiveObjective, check_pair, kl_divergence
from melbo.errors import MelboError
from melbo.engine.intervention import add_to_block_output
from melbo.engine.methods import Setting, SteeringAdapterMethod, SteeringVectorMethod
from melbo.engine.prompts import batch_from_ids
from melbo.engine.runner import discover, resume

S, T = 1, 2


def hidden(lm, ids, layer, perturb=None):
    """Block `layer`'s output for one prompt, full forward (h_t = hidden_states[t + 1])."""
    x = torch.tensor([ids])
    with perturb() if perturb else torch.no_grad():
        return lm.model(x, output_hidden_states=True).hidden_states[layer + 1][0]


def logprobs(lm, ids, perturb=None):
    x = torch.tensor([ids])
    with perturb() if perturb else torch.no_grad():
        return lm.model(x).logits[0].log_softmax(-1)


def vectors(lm, n=3, radius=3.0):
    method = SteeringVectorMethod(Setting(source=S, radius=radius, width=lm.width, orthogonal="none"))
    return method, method.init(n, torch.Generator().manual_seed(0), None)


@pytest.mark.parametrize("p,q", [(2, 1), (4, 2)])
def test_difference_form_equals_hand_computation(p, q):
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    method, params = vectors(aud)
    objective = ContrastiveObjective(aud, ref, batch, S, T, S, "difference", p, q)
    measured = objective(3, lambda lm: method.perturb(lm, params, len(batch)))
    for k in range(3):
        theta = params["vectors"][k].detach()
        total = 0.0
        for prompt in ids:
            changes = [hidden(m, prompt, T, lambda m=m: add_to_block_output(m, S, theta)) - hidden(m, prompt, T)
                       for m in (aud, ref)]
            total += float(((changes[0] - changes[1]).norm(dim=-1) ** p).sum()) ** (1 / q)
        assert measured.value[k].item() == pytest.approx(total, rel=2e-4)


def test_penalised_form_equals_hand_computation():
    aud, ref = tiny_lm("qwen3", seed=0), tiny_lm("qwen3", seed=1)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    method, params = vectors(aud)
    objective = ContrastiveObjective(aud, ref, batch, S, T, S, "penalised", 2, 1, weight=0.5)
    measured = objective(3, lambda lm: method.perturb(lm, params, len(batch)))
    theta = params["vectors"][1].detach()

    def plain(m):
        return sum(float(((hidden(m, x, T, lambda: add_to_block_output(m, S, theta)) - hidden(m, x, T))
                          .norm(dim=-1) ** 2).sum()) for x in ids)

    assert measured.value[1].item() == pytest.approx(plain(aud) - 0.5 * plain(ref), rel=2e-4)


def test_kl_form_equals_hand_computation():
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    ids = prompts_ids()
    batch = batch_from_ids(ids)
    method, params = vectors(aud)
    objective = ContrastiveObjective(aud, ref, batch, S, T, S, "kl", 2, 1)
    measured = objective(3, lambda lm: method.perturb(lm, params, len(batch)))
    theta = params["vectors"][2].detach()
    total = 0.0
    for x in ids:
        steered = [logprobs(m, x, lambda m=m: add_to_block_output(m, S, theta)) for m in (aud, ref)]
        clean = [logprobs(m, x) for m in (aud, ref)]
        total += float(kl_divergence(*steered).sum() - kl_divergence(*clean).sum())
    assert measured.value[2].item() == pytest.approx(total, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("form", ["difference", "penalised", "kl"])
def test_identical_models_give_zero(form):
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=0)
    batch = batch_from_ids(prompts_ids())
    method, params = vectors(aud)
    objective = ContrastiveObjective(aud, ref, batch, S, T, S, form, 2, 1, weight=1.0)
    measured = objective(3, lambda lm: method.perturb(lm, params, len(batch)))
    assert measured.value.abs().max().item() < 1e-5
    assert measured.value.requires_grad  # the optimiser can still step


def test_adapters_go_through_the_difference_form():
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    batch = batch_from_ids(prompts_ids())
    method = SteeringAdapterMethod.create(aud, Setting(source=S, radius=2.0, width=aud.width, rank=2,
                                                          orthogonal="none"))
    params = method.init(2, torch.Generator().manual_seed(0), None)
    objective = ContrastiveObjective(aud, ref, batch, S, T, method.replay_upto(S), "difference")
    measured = objective(2, lambda lm: method.perturb(lm, params, len(batch)))
    measured.value.sum().backward()
    assert (measured.value > 0).all() and params["a"].grad.abs().sum() > 0


def _settings(**kw):
    return dict(n_vectors=4, batch_size=2, steps=6, source=1, target=3, radius="2.0", **kw)


def test_diff_run_records_reference_trains_and_resumes_bitwise(tmp_path):
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    whole = discover(aud, ["abcdef"], tmp_path / "whole", reference=ref, **_settings())
    assert whole.config.contrast == "difference" and whole.config.reference.id == ref.model_id
    assert (whole.curves[:, -1] > whole.curves[:, 0]).all()

    def interrupt(event):
        if event["batch"] == 1 and event["step"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(aud, ["abcdef"], tmp_path / "cut", reference=ref, progress=interrupt, **_settings())
    with pytest.raises(MelboError, match="give the reference model"):
        resume(tmp_path / "cut", aud)
    other = tiny_lm("llama", seed=2)
    other.model_id = "tiny-other"
    with pytest.raises(MelboError, match="contrasted with reference tiny-llama"):
        resume(tmp_path / "cut", aud, reference=other)
    resumed = resume(tmp_path / "cut", aud, reference=ref)
    assert torch.equal(resumed.vectors, whole.vectors)


def test_diff_differs_from_plain_discovery(tmp_path):
    aud, ref = tiny_lm("llama", seed=0), tiny_lm("llama", seed=1)
    plain = discover(aud, ["abcdef"], tmp_path / "plain", **_settings())
    contrast = discover(aud, ["abcdef"], tmp_path / "diff", reference=ref, **_settings())
    assert not torch.allclose(plain.vectors, contrast.vectors)


def _narrow_llama():
    import transformers

    from melbo.engine.layers import find_blocks
    from melbo.engine.models import LoadedModel
    from tiny_models import tiny_config

    config = tiny_config("llama")
    config.hidden_size, config.num_attention_heads, config.head_dim = 32, 2, 16
    model = transformers.LlamaForCausalLM(config).eval()
    path, blocks = find_blocks(model)
    return LoadedModel(model, None, blocks, path, "tiny-narrow", "tiny-narrow")


def test_mismatched_models_are_refused():
    from melbo.engine.models import LoadedModel

    aud = tiny_lm("llama")
    with pytest.raises(MelboError, match="width 64 but the reference 32"):
        check_pair(aud, _narrow_llama())
    shallow = tiny_lm("llama", seed=1)
    shallow = LoadedModel(shallow.model, None, shallow.blocks[:3], shallow.blocks_path, "short", "short")
    with pytest.raises(MelboError, match="4 blocks but the reference 3"):
        check_pair(aud, shallow)
    with pytest.raises(MelboError, match="vectors or adapters"):
        discover(aud, ["x"], None, reference=tiny_lm("llama", seed=1), method="jacobian")
    with pytest.raises(MelboError, match="unknown contrast"):
        discover(aud, ["x"], None, reference=tiny_lm("llama", seed=1), contrast="ratio")
    with pytest.raises(MelboError, match="give the reference model"):
        discover(aud, ["x"], None, contrast="difference")
