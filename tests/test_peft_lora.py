"""peft as the reference for LoRA: one Personalized-MoE expert with gate weight 1 equals peft's LoRA on the same FFN
(outputs and gradients), and the NextLocLLM-style model (`dense_lora=True`) carries peft LoRA on every FFN
projection, trains only what it should, and round-trips through the trainable-state checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from nextlocmoe.errors import ConfigError
from nextlocmoe.model import ModelConfig, build_model
from nextlocmoe.model.backbone import DENSE_LORA_TARGETS, add_dense_lora
from nextlocmoe.model.personalized_moe import PersonalizedMoE, PersonalizedMoEConfig
from nextlocmoe.runs import load_trainable_state, trainable_state

D, F_FFN, D_H, D_KEY, R, ALPHA = 32, 64, 16, 24, 4, 8.0
PROJECTIONS = ("gate", "up", "down")
STATS = dict(x_mean=0.0, x_std=1000.0, y_mean=0.0, y_std=1000.0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------
# one Personalized-MoE expert == peft's LoRA

def single_expert_and_peft(expert_compute: str) -> tuple[PersonalizedMoE, LlamaMLP]:
    """A one-expert Personalized MoE (softmax over one expert: gate weight exactly 1) with random non-zero LoRA B,
    and a copy of the same FFN with peft's LoRA holding the same A and B."""
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=D, intermediate_size=F_FFN))
    cfg = PersonalizedMoEConfig(num_experts=1, top_k=1, lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                expert_compute=expert_compute)
    moe = PersonalizedMoE(mlp, D_H, torch.randn(1, D_KEY), cfg).eval()
    with torch.no_grad():
        for proj in PROJECTIONS:
            getattr(moe, f"lora_B_{proj}").normal_(0.0, 0.3)
    reference = inject_adapter_in_model(
        LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=[f"{p}_proj" for p in PROJECTIONS]),
        copy.deepcopy(mlp)).eval()      # a copy: peft replaces the Linear modules in place, and moe uses mlp's
    with torch.no_grad():
        for proj in PROJECTIONS:
            lora = getattr(reference, f"{proj}_proj")
            lora.lora_A["default"].weight.copy_(getattr(moe, f"lora_A_{proj}")[0].T)   # (r, in)
            lora.lora_B["default"].weight.copy_(getattr(moe, f"lora_B_{proj}")[0].T)   # (out, r)
    return moe, reference


def forward_backward(moe: PersonalizedMoE, reference: LlamaMLP, x: torch.Tensor, history: torch.Tensor,
                     cotangent: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Outputs and gradients (input, every A and B) of both, in the same layout ((in, r) and (r, out))."""
    results = []
    for which in ("moe", "peft"):
        xi = x.clone().requires_grad_(True)
        if which == "moe":
            moe.zero_grad(set_to_none=True)
            out = moe(xi, history)
            assert torch.equal(out.gate_probs, torch.ones_like(out.gate_probs)) and out.selected.all()
            out = out.output
        else:
            reference.zero_grad(set_to_none=True)
            out = reference(xi)
        (out * cotangent).sum().backward()
        got = {"output": out.detach(), "grad_input": xi.grad}
        for proj in PROJECTIONS:
            if which == "moe":
                got[f"A_{proj}"] = getattr(moe, f"lora_A_{proj}").grad[0]
                got[f"B_{proj}"] = getattr(moe, f"lora_B_{proj}").grad[0]
            else:
                lora = getattr(reference, f"{proj}_proj")
                got[f"A_{proj}"] = lora.lora_A["default"].weight.grad.T
                got[f"B_{proj}"] = lora.lora_B["default"].weight.grad.T
        results.append(got)
    return results[0], results[1]


@pytest.mark.parametrize("expert_compute", ["grouped", "pairs"])
def test_one_expert_with_gate_weight_one_equals_peft_lora(expert_compute):
    moe, reference = single_expert_and_peft(expert_compute)
    g = torch.Generator().manual_seed(1)
    x, history = torch.randn(3, 7, D, generator=g), torch.randn(3, D_H, generator=g)
    cotangent = torch.randn(3, 7, D, generator=g)
    ours, theirs = forward_backward(moe, reference, x, history, cotangent)
    assert set(ours) == set(theirs) == {"output", "grad_input", *(f"{ab}_{p}" for ab in "AB" for p in PROJECTIONS)}
    errors = {k: relative_error(ours[k], theirs[k]) for k in ours}
    assert max(errors.values()) < 1e-5, errors
    # the LoRA terms matter (B is not zero) and the comparison can fail: one changed weight breaks it
    plain = reference.gate_proj.base_layer(x)
    assert relative_error(reference.gate_proj(x), plain) > 1e-2
    with torch.no_grad():
        reference.down_proj.lora_B["default"].weight[0, 0] += 1e-2
    ours, theirs = forward_backward(moe, reference, x, history, cotangent)
    assert relative_error(ours["output"], theirs["output"]) > 1e-5


# ---------------------------------------------------------------------------------------------------------
# the NextLocLLM-style model: peft LoRA on every dense FFN

def dense_model(seed: int = 0, **overrides):
    kw = dict(backbone="tiny", num_layers=3, pmoe_layers=(), use_prompt=False, seed=seed, tcn_channels=(176, 176),
              use_personalized_moe=False, use_location_moe=False, use_history_router=False, dense_lora=True,
              regression_offset=False)   # the paper's head: its output reads the backbone from step 0 on
    kw.update(overrides)
    torch.manual_seed(seed)
    return build_model(ModelConfig(**kw), STATS, np.random.default_rng(0).normal(0, 900, (20, 2)), np.zeros(20))


def random_batch(B: int = 3, H: int = 40, C: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for prefix, T in (("hist", H), ("cur", C)):
        out[f"{prefix}_xy"] = torch.randn(B, T, 2, generator=g)
        out[f"{prefix}_weekday"] = torch.randint(0, 7, (B, T), generator=g)
        out[f"{prefix}_hour"] = torch.randint(0, 24, (B, T), generator=g)
        out[f"{prefix}_duration"] = torch.rand(B, T, generator=g)
    out["target_xy"] = torch.randn(B, 2, generator=g) * 500
    out["target_location"] = torch.randint(0, 20, (B,), generator=g)
    out["next_hour"], out["next_weekday"] = torch.randint(0, 24, (B,), generator=g), torch.randint(0, 7, (B,), generator=g)
    return out


def test_dense_lora_is_peft_lora_on_every_ffn_projection_and_only_lora_norms_and_new_modules_train():
    model = dense_model()
    cfg, lora_cfg = model.llama.config, model.cfg.personalized
    for layer in model.llama.layers:
        for name in DENSE_LORA_TARGETS:
            proj = getattr(layer.mlp, name)
            assert isinstance(proj, LoraLayer)
            assert proj.r["default"] == lora_cfg.lora_r
            assert proj.scaling["default"] == lora_cfg.lora_alpha / lora_cfg.lora_r
            assert proj.lora_dropout["default"].p == lora_cfg.lora_dropout
            assert not proj.base_layer.weight.requires_grad
            assert not proj.lora_B["default"].weight.any()        # B starts at zero
    for name, p in model.named_parameters():
        in_backbone = name.startswith("llama.")
        is_lora = ".lora_A.default." in name or ".lora_B.default." in name
        is_norm = in_backbone and name.split(".")[-2].endswith("norm")
        assert p.requires_grad == (is_lora or is_norm or not in_backbone), name
    d, f, r = cfg.hidden_size, cfg.intermediate_size, lora_cfg.lora_r
    counts = model.parameter_counts()
    assert counts["trainable_dense_lora"] == cfg.num_hidden_layers * 3 * r * (d + f)
    assert counts["trainable_backbone_norms"] == (2 * cfg.num_hidden_layers + 1) * d


def test_dense_lora_forward_backward_reaches_lora_and_not_the_frozen_ffn():
    model = dense_model().train()
    batch = random_batch()
    loss, _ = model.loss(model(batch), batch)
    loss.backward()
    for layer in model.llama.layers:
        for name in DENSE_LORA_TARGETS:
            proj = getattr(layer.mlp, name)
            assert proj.lora_B["default"].weight.grad.abs().sum() > 0   # A is random, so B gets a gradient at once
            assert proj.base_layer.weight.grad is None
    assert model.llama.norm.weight.grad is not None


def test_dense_lora_round_trips_through_the_trainable_state_checkpoint():
    # the same frozen backbone (it is rebuilt from its source, not stored); different trainable values
    source, target = dense_model().eval(), dense_model().eval()
    with torch.no_grad():
        for layer in source.llama.layers:
            for name in DENSE_LORA_TARGETS:
                getattr(layer.mlp, name).lora_B["default"].weight.normal_(0.0, 0.05)
        for p in target.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = random_batch()
    assert not torch.allclose(source(batch).pred_xy, target(batch).pred_xy)
    state = trainable_state(source)
    assert "llama.layers.2.mlp.down_proj.lora_B.default.weight" in state
    load_trainable_state(target, state)
    assert torch.equal(source(batch).pred_xy, target(batch).pred_xy)


def test_a_second_dense_lora_is_a_clear_error():
    model = dense_model()
    with pytest.raises(ConfigError, match="already holds a LoRA"):
        add_dense_lora(model.llama, 16, 16.0, 0.0)


def test_dense_lora_adds_rank_r_adapters_to_every_ffn_and_only_they_are_new_trainables():
    plain, dense = dense_model(dense_lora=False), dense_model()
    cfg = dense.llama.config
    d, f, layers, r = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, 16
    expected = layers * 3 * r * (d + f)   # gate and up: r (d + f); down: r (f + d)
    before, after = plain.parameter_counts(), dense.parameter_counts()
    assert after["trainable_dense_lora"] == expected
    assert after["trainable"] - before["trainable"] == expected and after["frozen"] == before["frozen"]
    assert after["trainable_backbone_norms"] == before["trainable_backbone_norms"]
    trainable = {n for n, p in dense.named_parameters() if p.requires_grad and ".mlp." in n}
    assert trainable == {f"llama.layers.{i}.mlp.{proj}.lora_{ab}.default.weight"   # peft's adapter "default"
                         for i in range(layers) for proj in ("gate_proj", "up_proj", "down_proj") for ab in "AB"}


def test_dense_lora_equals_the_plain_ffn_while_b_is_zero_and_trains():
    plain, dense = dense_model(dense_lora=False).eval(), dense_model().eval()
    batch = random_batch()
    assert torch.allclose(plain(batch).pred_xy, dense(batch).pred_xy, atol=1e-5)
    dense.train()
    loss, _ = dense.loss(dense(batch), batch)
    loss.backward()
    mlp = dense.llama.layers[0].mlp
    assert mlp.gate_proj.lora_B["default"].weight.grad.abs().sum() > 0   # B gets a gradient at once (A is random)
    assert mlp.gate_proj.base_layer.weight.grad is None                  # the pretrained FFN stays frozen
    with torch.no_grad():                                                # a non-zero B changes the function
        mlp.down_proj.lora_B["default"].weight.normal_()
    assert not torch.allclose(plain.eval()(batch).pred_xy, dense.eval()(batch).pred_xy, atol=1e-3)
