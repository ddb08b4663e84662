"""Personalized MoE: routing rules against hand cases and a brute force, and the shared-base layer against the
naive one-copy-per-expert formulation (forward and gradients)."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.errors import ConfigError
from nextlocmoe.model.config import EXPERT_COMPUTES, PersonalizedMoEConfig
from nextlocmoe.model.personalized_moe import MoEOutput, NaivePersonalizedMoE, PersonalizedMoE, route

D, F_FFN, D_H, D_KEY, E = 32, 64, 16, 24, 11
COMPUTES = [c for c in EXPERT_COMPUTES if c != "auto"]   # every formulation of the mixture


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def make_moe(seed=0, mlp_bias=False, sharpen=30.0, **cfg_kwargs) -> PersonalizedMoE:
    """A small layer with random non-zero LoRA B (so LoRA matters) and a sharp gate (so routing varies)."""
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F_FFN, mlp_bias=mlp_bias))
    moe = PersonalizedMoE(mlp, D_H, torch.randn(E, D_KEY), PersonalizedMoEConfig(**cfg_kwargs))
    with torch.no_grad():
        for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
            getattr(moe, name).normal_(0.0, 0.2)
        moe.gate.proj_out.weight.mul_(sharpen)
    return moe.eval()


def mask_of(probs, **cfg_kwargs):
    cfg = PersonalizedMoEConfig(**{"num_experts": len(probs), **cfg_kwargs})
    return route(torch.tensor([probs]), cfg)[0].tolist()


# ---------------------------------------------------------------------------------------------- routing

def test_threshold_hand_cases():
    assert mask_of([0.5, 0.35, 0.1, 0.05]) == [True, True, False, False]
    # same probabilities in another expert order: the mask must follow the experts (the reference's bug)
    assert mask_of([0.1, 0.5, 0.05, 0.35]) == [False, True, False, True]
    assert mask_of([0.9, 0.05, 0.05]) == [True, False, False]                 # one confident expert
    assert mask_of([0.8, 0.2]) == [True, False]                                # reaching 0.8 exactly is enough
    assert mask_of([0.5, 0.3, 0.2]) == [True, True, False]
    assert mask_of([0.3, 0.3, 0.3, 0.1]) == [True, True, True, False]          # ties
    assert mask_of([0.15, 0.2, 0.2, 0.45]) == [False, True, True, True]
    assert mask_of([0.2, 0.2, 0.45, 0.15], threshold=0.6) == [True, False, True, False]   # tie: lower index first
    assert mask_of([1 / 11] * 11) == [True] * 5 + [False] * 6                  # the cap of 5
    assert mask_of([0.25] * 4, max_experts=2) == [True, True, False, False]


def test_topk_hand_cases():
    assert mask_of([0.5, 0.35, 0.1, 0.05], routing="topk") == [True, True, False, False]
    assert mask_of([0.05, 0.1, 0.35, 0.5], routing="topk") == [False, False, True, True]
    assert mask_of([0.1, 0.3, 0.3, 0.3], routing="topk") == [False, True, True, False]   # tie: lower index first
    assert mask_of([0.7, 0.2, 0.1], routing="topk", top_k=1) == [True, False, False]


def brute_force_threshold(probs: list[float], threshold: float, cap: int) -> set[int]:
    ranking = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    kept, mass = set(), 0.0
    for i in ranking:
        if mass >= threshold or len(kept) == cap:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_threshold_routing_properties_on_random_probs():
    torch.manual_seed(1)
    probs = torch.cat([torch.distributions.Dirichlet(torch.full((E,), c)).sample((300,))
                       for c in (0.05, 0.3, 2.0)])                                   # (900, E): sharp to flat
    mask = route(probs, PersonalizedMoEConfig())
    counts = mask.sum(-1)
    assert set(counts.tolist()) == {1, 2, 3, 4, 5}      # the sample covers every set size, never more than 5
    for p, m in zip(probs.double().tolist(), mask.tolist()):
        kept = {i for i, keep in enumerate(m) if keep}
        assert kept == brute_force_threshold(p, 0.8, 5)
        mass = sum(p[i] for i in kept)
        assert mass >= 0.8 - 1e-6 or len(kept) == 5                    # reaches the threshold unless capped
        assert min(p[i] for i in kept) >= max([p[i] for i in range(E) if i not in kept], default=0.0)
        assert mass - min(p[i] for i in kept) < 0.8 + 1e-6             # minimal: one fewer would not reach it


def test_topk_selects_exactly_k():
    probs = torch.softmax(torch.randn(4, 9, E), dim=-1)
    mask = route(probs, PersonalizedMoEConfig(routing="topk"))
    assert (mask.sum(-1) == 2).all()
    top2 = probs.topk(2, dim=-1).indices
    assert mask.gather(-1, top2).all()


# ---------------------------------------------------------------------------------------------- the layer

def test_separable_gate_equals_concatenated_gate():
    moe = make_moe(sharpen=1.0)
    x, h = torch.randn(3, 7, D), torch.randn(3, D_H)
    separable = moe.gate_logits(x, h)
    concatenated = moe.gate_logits_concatenated(x, h)
    assert separable.shape == (3, 7, E)
    assert relative_error(separable, concatenated) < 1e-6


@pytest.mark.parametrize("expert_compute", COMPUTES)
@pytest.mark.parametrize("routing", ["threshold", "topk"])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_efficient_equals_naive_forward_and_gradients(expert_compute, routing, renormalize, mlp_bias):
    moe = make_moe(routing=routing, renormalize=renormalize, mlp_bias=mlp_bias, expert_compute=expert_compute)
    naive = NaivePersonalizedMoE.from_efficient(moe)
    x = torch.randn(4, 9, D)
    h = torch.randn(4, D_H)
    x_eff, x_naive = x.clone().requires_grad_(), x.clone().requires_grad_()
    readout = torch.randn(4, 9, D)

    out_eff, out_naive = moe(x_eff, h), naive(x_naive, h)
    assert isinstance(out_eff, MoEOutput)
    assert torch.equal(out_eff.selected, out_naive.selected)
    counts = out_eff.selected.sum(-1)
    if routing == "threshold":   # the sharpened gate makes routing vary from token to token
        assert counts.min() < counts.max() <= 5
    else:
        assert (counts == 2).all()
    assert relative_error(out_eff.output, out_naive.output) < 1e-5
    assert relative_error(out_eff.gate_probs, out_naive.gate_probs) < 1e-5
    assert abs((out_eff.entropy - out_naive.entropy).item()) < 1e-5 * max(1.0, out_naive.entropy.item())

    for out, inp in ((out_eff, x_eff), (out_naive, x_naive)):
        ((out.output * readout).sum() + 0.5 * out.entropy).backward()

    assert relative_error(x_eff.grad, x_naive.grad) < 1e-5
    naive_gate = dict(naive.gate.named_parameters())
    for name, p in moe.gate.named_parameters():
        if name == "proj_out.bias":   # a shift of every logit: the softmax ignores it, its gradient is ~0
            assert abs(float(p.grad)) < 1e-5 and abs(float(naive_gate[name].grad)) < 1e-5
        else:
            assert relative_error(p.grad, naive_gate[name].grad) < 1e-5, name
    for proj in ("gate", "up", "down"):
        for factor in ("A", "B"):
            grad_eff = getattr(moe, f"lora_{factor}_{proj}").grad                      # (E, in, r) / (E, r, out)
            grad_naive = torch.stack([getattr(getattr(ex, f"{proj}_proj"), f"lora_{factor}").weight.grad.T
                                      for ex in naive.experts])
            assert relative_error(grad_eff, grad_naive) < 1e-5, (proj, factor)
    assert all(p.grad is None for p in moe.base_mlp.parameters())


def test_base_ffn_is_shared_frozen_and_lora_starts_at_zero():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F_FFN))
    moe = PersonalizedMoE(mlp, D_H, torch.randn(E, D_KEY), PersonalizedMoEConfig(renormalize=True)).eval()
    assert moe.base_mlp is mlp
    assert not any(p.requires_grad for p in mlp.parameters())
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable == {"gate.proj_in.weight", "gate.proj_in.bias", "gate.proj_out.weight", "gate.proj_out.bias",
                         *(f"lora_{f}_{p}" for f in "AB" for p in ("gate", "up", "down"))}
    assert moe.lora_B_gate.shape == (E, 16, F_FFN) and moe.lora_A_down.shape == (E, F_FFN, 16)
    x, h = torch.randn(2, 5, D), torch.randn(2, D_H)
    # LoRA B = 0: every expert is the frozen FFN, and renormalised weights sum to 1
    torch.testing.assert_close(moe(x, h).output, mlp(x), rtol=1e-5, atol=1e-6)
    moe.cfg.renormalize = False
    out = moe(x, h)
    kept_mass = (out.gate_probs * out.selected).sum(-1, keepdim=True)
    torch.testing.assert_close(out.output, kept_mass * mlp(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert_compute", COMPUTES)
def test_unselected_experts_do_not_matter(expert_compute):
    moe = make_moe(routing="topk", expert_compute=expert_compute)
    x, h = torch.randn(2, 6, D), torch.randn(2, D_H)
    out = moe(x, h)
    never_used = (~out.selected).all(dim=(0, 1)).nonzero().flatten()
    assert len(never_used) > 0
    with torch.no_grad():
        for name in ("lora_A_gate", "lora_B_up", "lora_B_down"):
            getattr(moe, name)[never_used] = 1e3
    assert torch.equal(moe(x, h).output, out.output)


def test_entropy_is_mean_token_entropy():
    moe = make_moe(sharpen=1.0)
    x, h = torch.randn(2, 4, D), torch.randn(2, D_H)
    out = moe(x, h)
    p = out.gate_probs.double()
    expected = sum(-(pi * pi.log()).sum() for pi in p.reshape(-1, E)) / p.reshape(-1, E).shape[0]
    assert abs(out.entropy.item() - expected.item()) < 1e-5
    torch.testing.assert_close(out.gate_probs.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("expert_compute", COMPUTES)
def test_dropout_only_in_training_and_bf16_runs(expert_compute):
    moe = make_moe(expert_compute=expert_compute)
    x, h = torch.randn(2, 6, D), torch.randn(2, D_H)
    assert torch.equal(moe(x, h).output, moe(x, h).output)
    moe.train()
    assert not torch.equal(moe(x, h).output, moe(x, h).output)
    moe_bf16 = make_moe(expert_compute=expert_compute).to(torch.bfloat16).eval()
    out = moe_bf16(x.bfloat16(), h.bfloat16())
    assert out.output.dtype == torch.bfloat16 and out.gate_probs.dtype == torch.float32
    assert torch.isfinite(out.output.float()).all()


def test_bad_configuration_raises():
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F_FFN))
    with pytest.raises(ConfigError, match="routing"):
        PersonalizedMoE(mlp, D_H, torch.randn(E, D_KEY), PersonalizedMoEConfig(routing="top-p"))
    with pytest.raises(ConfigError, match="threshold"):
        PersonalizedMoEConfig(threshold=1.5).validate()
    with pytest.raises(ConfigError, match="top_k"):
        PersonalizedMoEConfig(top_k=12).validate()
    with pytest.raises(ConfigError, match="expert_compute"):
        PersonalizedMoEConfig(expert_compute="sparse").validate()
    with pytest.raises(ConfigError, match="role_keys"):
        PersonalizedMoE(mlp, D_H, torch.randn(E - 1, D_KEY))
    moe = PersonalizedMoE(mlp, D_H, torch.randn(E, D_KEY))
    with pytest.raises(ConfigError, match="history"):
        moe(torch.randn(2, 3, D), torch.randn(2, D_H + 1))
