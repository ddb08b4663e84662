"""The assembled NextLocMoE on the tiny random backbone: shapes, freezing, gradients, causality, switches,
precision, equality with transformers' own LLaMA forward, and a short training run."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import yaml

from nextlocmoe.data.schema import FUNCTIONS, ROLES
from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.model import ModelConfig, NextLocMoE, PersonalizedMoEConfig, build_model, load_backbone
from nextlocmoe.model.heads import final_norm_float32
from nextlocmoe.model.location_moe import LocationSemanticsMoE, expert_weights_from_descriptions
from nextlocmoe.model.texts import FUNCTION_DESCRIPTIONS, ROLE_DESCRIPTIONS, TASK_PROMPT, role_names

H, C, L = 40, 5, 30
STATS = dict(x_mean=120.0, x_std=900.0, y_mean=-40.0, y_std=700.0)


def make_batch(B: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        hist_xy=torch.randn(B, H, 2, generator=g), hist_weekday=torch.randint(0, 7, (B, H), generator=g),
        hist_hour=torch.randint(0, 24, (B, H), generator=g), hist_duration=torch.rand(B, H, generator=g),
        hist_location=torch.randint(0, L, (B, H), generator=g),
        cur_xy=torch.randn(B, C, 2, generator=g), cur_weekday=torch.randint(0, 7, (B, C), generator=g),
        cur_hour=torch.randint(0, 24, (B, C), generator=g), cur_duration=torch.rand(B, C, generator=g),
        cur_location=torch.randint(0, L, (B, C), generator=g),
        target_xy=(torch.randn(B, 2, generator=g) * 800).float(), target_location=torch.randint(0, L, (B,), generator=g),
        user=torch.zeros(B, dtype=torch.long), subuser=torch.zeros(B, dtype=torch.long),
        next_hour=torch.randint(0, 24, (B,), generator=g), next_weekday=torch.randint(0, 7, (B,), generator=g),
    )


def candidates(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 800, size=(L, 2)), rng.integers(-1, len(FUNCTIONS), size=L)


def make_model(seed: int = 0, **overrides) -> NextLocMoE:
    """Tiny backbone, 4 layers, P-MoE at layers 1 and 3, a 2-level TCN (the reference's 5 levels only where the
    shapes are checked: they cost most of the CPU time); the prompt is off unless asked (byte tokens are long)."""
    kw = dict(backbone="tiny", num_layers=4, pmoe_layers=(1, 3), use_prompt=False, seed=seed, tcn_channels=(176, 176))
    kw.update(overrides)
    torch.manual_seed(seed)
    xy, fn = candidates()
    return build_model(ModelConfig(**kw), STATS, xy, fn).eval()


# ---------------------------------------------------------------------------------------------------------
# config and texts

def test_config_round_trips_through_yaml_and_rejects_bad_values():
    cfg = ModelConfig(backbone="tiny", num_layers=4, pmoe_layers=(1, 3), head="ranking",
                      personalized=PersonalizedMoEConfig(routing="topk", num_experts=6))
    again = ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg and isinstance(again.pmoe_layers, tuple) and isinstance(again.personalized, PersonalizedMoEConfig)
    assert cfg.token_dim == 176 and cfg.history_dim == 176
    with pytest.raises(ConfigError, match="head"):
        ModelConfig(head="classification")
    with pytest.raises(ConfigError, match="pmoe_layers"):
        ModelConfig(num_layers=4, pmoe_layers=(8, 10))
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelConfig.from_dict({"backbone": "tiny", "layers": 3})


def test_texts_cover_every_function_and_role():
    assert tuple(FUNCTION_DESCRIPTIONS) == FUNCTIONS and tuple(ROLE_DESCRIPTIONS) == ROLES
    texts = [TASK_PROMPT, *FUNCTION_DESCRIPTIONS.values(), *ROLE_DESCRIPTIONS.values()]
    assert all(len(t.split()) >= 20 for t in texts) and len(set(texts)) == len(texts)
    assert role_names(11) == ROLES
    assert role_names(4) == ROLES[:3] + ("Undefined",) and role_names(1) == ("Undefined",)
    with pytest.raises(ConfigError, match="num_experts"):
        role_names(12)


# ---------------------------------------------------------------------------------------------------------
# forward, backward, parameters

@pytest.mark.parametrize("head", ["regression", "ranking"])
def test_forward_backward_shapes(head):
    model = make_model(head=head, tcn_channels=(176,) * 5).train()
    batch = make_batch(B=3)
    out = model(batch)
    if head == "regression":
        assert out.pred_xy.shape == (3, 2) and out.pred_xy.dtype == torch.float32 and out.scores is None
    else:
        assert out.scores.shape == (3, L) and out.scores.dtype == torch.float32 and out.pred_xy is None
    assert out.history.shape == (3, 176)
    assert out.location_moe.output.shape == (3, C, 128) and out.location_moe.gate_probs.shape == (3, C, 5)
    assert len(out.personalized) == 2
    T = H + C
    for moe in out.personalized:
        assert moe.output.shape == (3, T, 64) and moe.gate_probs.shape == (3, T, 11) and moe.selected.shape == (3, T, 11)
    loss, parts = model.loss(out, batch)
    assert torch.isfinite(loss) and "pmoe_entropy" in parts and "loss" in parts
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    points, scores = model.predict_points(batch), model.predict_scores(batch)
    assert points.shape == (3, 2) and scores.shape == (3, L)


def test_only_intended_parameters_are_trainable():
    model = make_model()
    for name, p in model.llama.named_parameters():
        # backbone: only the RMSNorms train (input, post-attention, final)
        assert p.requires_grad == ("norm" in name), name
    new_modules = [model.token_features, model.token_projections, model.history_router, model.location_moe, model.head]
    assert all(p.requires_grad for m in new_modules for p in m.parameters())
    for moe in model.personalized_moe.values():
        base = {id(p) for p in moe.base_mlp.parameters()}
        for name, p in moe.named_parameters():
            assert p.requires_grad == (id(p) not in base), name   # gate + LoRA train, the shared FFN does not
        assert any(moe.base_mlp is layer.mlp for layer in model.llama.layers)   # shared, not copied
    # counts agree with a brute-force count over unique tensors
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}.values()
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in unique)
    assert counts["trainable"] == sum(p.numel() for p in unique if p.requires_grad)
    assert counts["frozen"] == counts["total"] - counts["trainable"]
    assert set(map(id, model.trainable_parameters())) == {id(p) for p in unique if p.requires_grad}


def test_gradients_reach_router_location_moe_gates_and_lora():
    model = make_model()
    with torch.no_grad():   # LoRA B starts at zero (standard LoRA); give it values so A receives gradient too
        for moe in model.personalized_moe.values():
            for name in ("lora_B_gate", "lora_B_up", "lora_B_down"):
                getattr(moe, name).normal_(0, 0.05)
        if model.cfg.regression_offset:   # so does the offset head's map (step 0 = its origin): same reason
            model.head.projection.weight.normal_(0, 0.05)
    batch = make_batch(B=4)
    loss, _ = model.loss(model(batch), batch)
    loss.backward()

    def moved(params):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)

    assert moved(model.history_router.tcn.parameters())
    assert moved([model.location_moe.expert_weights, *model.location_moe.gate.parameters()])
    for moe in model.personalized_moe.values():
        # proj_out's bias adds the same constant to every expert's logit, which the softmax cancels: its gradient is
        # zero up to rounding (exactly zero on some batches), so it is left out of the check
        gate = dict(moe.gate.named_parameters())
        assert moved([p for n, p in gate.items() if n != "proj_out.bias"])
        assert gate["proj_out.bias"].grad is None or gate["proj_out.bias"].grad.abs().item() < 1e-4
        assert moved([getattr(moe, f"lora_{ab}_{proj}") for ab in "AB" for proj in ("gate", "up", "down")])
        assert all(p.grad is None for p in moe.base_mlp.parameters())
    assert moved([model.llama.norm.weight, model.llama.layers[0].input_layernorm.weight])
    assert model.llama.embed_tokens.weight.grad is None
    assert all(p.grad is None for p in model.llama.layers[0].self_attn.parameters())


# ---------------------------------------------------------------------------------------------------------
# causality and equality with transformers' LLaMA forward

def hidden_states(model: NextLocMoE, batch) -> torch.Tensor:
    tokens, h, _ = model.embed_inputs(batch)
    return model.run_backbone(tokens, h)[0]     # (B, T, D) before the final norm


def use_attention(model: NextLocMoE, implementation: str) -> NextLocMoE:
    """sdpa (the default: causal mask None, sdpa's is_causal) or eager (an explicit additive mask)."""
    model.llama.config._attn_implementation = implementation
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_changing_a_later_token_never_changes_an_earlier_hidden_state(attention):
    # history router on: the last current record only moves the last position
    model = use_attention(make_model(), attention)
    batch = make_batch()
    base = hidden_states(model, batch)
    changed = dict(batch, cur_xy=batch["cur_xy"].clone())
    changed["cur_xy"][:, -1] += 3.0
    after = hidden_states(model, changed)
    torch.testing.assert_close(after[:, :-1], base[:, :-1], rtol=0, atol=1e-6)
    assert (after[:, -1] - base[:, -1]).abs().max() > 1e-3

    # history router off (h no longer sees the whole history), with the prompt: history record j sits at
    # position P + j; everything before it must stay, everything from it on must move
    model = use_attention(make_model(use_history_router=False, use_prompt=True), attention)
    P = model.prompt_embeddings.shape[0]
    base = hidden_states(model, batch)
    j = 17
    changed = dict(batch, hist_xy=batch["hist_xy"].clone())
    changed["hist_xy"][:, j] += 3.0
    after = hidden_states(model, changed)
    torch.testing.assert_close(after[:, :P + j], base[:, :P + j], rtol=0, atol=1e-6)
    assert ((after[:, P + j:] - base[:, P + j:]).abs().amax(dim=-1) > 1e-5).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_dense_layer_loop_equals_transformers_llama_forward(attention):
    model = use_attention(make_model(use_location_moe=False, use_personalized_moe=False, use_prompt=True), attention)
    tokens, h, _ = model.embed_inputs(make_batch())
    ours = final_norm_float32(model.llama.norm, model.run_backbone(tokens, h)[0])
    reference = model.llama(inputs_embeds=tokens).last_hidden_state
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pmoe_layers_with_identity_experts_equal_transformers_llama_forward():
    # LoRA B = 0 makes every expert the frozen FFN; renormalised weights sum to 1, so each P-MoE layer must
    # equal the dense layer: this checks the hand-written attention + residual path of the P-MoE layers
    cfg = PersonalizedMoEConfig(renormalize=True)
    model = make_model(use_location_moe=False, personalized=cfg)
    tokens, h, _ = model.embed_inputs(make_batch())
    hidden, personalized = model.run_backbone(tokens, h)
    assert len(personalized) == 2
    reference = model.llama(inputs_embeds=tokens).last_hidden_state
    torch.testing.assert_close(final_norm_float32(model.llama.norm, hidden), reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# switches (ablations)

@torch.no_grad()
def test_prompt_switch_prepends_the_frozen_prompt_embeddings():
    batch = make_batch()
    with_prompt, without = make_model(use_prompt=True), make_model(use_prompt=False)
    tokens_on, _, _ = with_prompt.embed_inputs(batch)
    tokens_off, _, _ = without.embed_inputs(batch)
    backbone = load_backbone("tiny", 4)
    ids = backbone.tokenizer_encode(TASK_PROMPT)
    table = with_prompt.llama.embed_tokens.weight
    assert tokens_on.shape[1] == len(ids) + H + C and tokens_off.shape[1] == H + C
    torch.testing.assert_close(tokens_on[0, :len(ids)], table[torch.tensor(ids)])
    torch.testing.assert_close(tokens_on[:, len(ids):], tokens_off)   # same seed: same trajectory tokens
    assert without.prompt_embeddings is None


@torch.no_grad()
def test_location_moe_switch_and_brute_force_mixture():
    batch = make_batch()
    model = make_model()
    out = model(batch)
    moe = out.location_moe
    assert (moe.selected.sum(-1) == 2).all()                       # exactly two function experts per token
    # brute force: per token, the two most probable experts, raw probabilities, plus the shared projection
    W = model.location_moe.expert_weights                          # (5, 128, 2)
    shared = model.token_features.coordinate_projection.weight     # (128, 2)
    for b in range(2):
        for c in range(C):
            p = moe.gate_probs[b, c].tolist()
            top = sorted(range(5), key=lambda e: -p[e])[:2]
            assert set(torch.nonzero(moe.selected[b, c]).flatten().tolist()) == set(top)
            xy = batch["cur_xy"][b, c]
            expected = shared @ xy + sum(p[e] * (W[e] @ xy) for e in top)
            torch.testing.assert_close(moe.output[b, c], expected, rtol=1e-5, atol=1e-5)

    plain = make_model(use_location_moe=False)
    assert plain.location_moe is None and plain(batch).location_moe is None
    tokens, _, _ = plain.embed_inputs(batch)
    features = plain.token_features(batch["cur_xy"], batch["cur_weekday"], batch["cur_hour"], batch["cur_duration"])
    torch.testing.assert_close(tokens[:, H:], plain.token_projections.current_projection(features))


@torch.no_grad()
def test_personalized_moe_switch():
    model = make_model(use_personalized_moe=False)
    batch = make_batch()
    out = model(batch)
    assert out.personalized == [] and len(model.personalized_moe) == 0
    _, parts = model.loss(out, batch)
    assert float(parts["pmoe_entropy"]) == 0.0
    assert model.parameter_counts()["trainable_personalized_moe"] == 0


@torch.no_grad()
def test_history_router_switch_zeroes_h_and_detaches_gates_from_history():
    batch = make_batch()
    changed = dict(batch, hist_xy=batch["hist_xy"] + 2.0, hist_hour=(batch["hist_hour"] + 5) % 24)

    with_router = make_model()
    gates = with_router(batch).location_moe.gate_probs
    assert not torch.allclose(gates, with_router(changed).location_moe.gate_probs)

    model = make_model(use_history_router=False)
    seen = []
    for moe in model.personalized_moe.values():
        moe.register_forward_hook(lambda module, args, output: seen.append(args[1]))
    out = model(batch)
    assert model.history_router is None and (out.history == 0).all()
    assert len(seen) == 2 and all((h == 0).all() for h in seen)   # the P-MoE gates receive zeros too
    torch.testing.assert_close(out.location_moe.gate_probs, model(changed).location_moe.gate_probs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# precision

@torch.no_grad()
def test_head_runs_in_float32_under_a_bf16_backbone():
    model = make_model(dtype="bfloat16", regression_origin="current")   # the origin is read off the batch
    model.head.projection.weight.normal_(0, 0.05)   # the offset head starts at zero: make the map matter
    assert model.llama.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    batch = make_batch()
    out = model(batch)
    assert out.pred_xy.dtype == torch.float32
    # independent float64 recomputation from the same bf16 hidden state
    last = hidden_states(model, batch)[:, -1].double()                               # (B, D)
    assert hidden_states(model, batch).dtype == torch.bfloat16
    normed = last / torch.sqrt(last.pow(2).mean(-1, keepdim=True) + model.llama.norm.variance_epsilon)
    normed = normed * model.llama.norm.weight.double()
    z = normed @ model.head.projection.weight.double().T + model.head.projection.bias.double()
    z = z + batch["cur_xy"][:, -1].double()                                            # offset from the current place
    expected = z * torch.tensor([STATS["x_std"], STATS["y_std"]], dtype=torch.float64) \
        + torch.tensor([STATS["x_mean"], STATS["y_mean"]], dtype=torch.float64)
    torch.testing.assert_close(out.pred_xy.double(), expected, rtol=1e-5, atol=1e-3)


@torch.no_grad()
def test_head_stays_float32_under_autocast():
    model = make_model(regression_origin="current")
    model.head.projection.weight.normal_(0, 0.05)   # the offset head starts at zero: make the map matter
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        last = hidden_states(model, batch)[:, -1].double()
    assert out.pred_xy.dtype == torch.float32
    normed = last / torch.sqrt(last.pow(2).mean(-1, keepdim=True) + model.llama.norm.variance_epsilon)
    z = (normed * model.llama.norm.weight.double()) @ model.head.projection.weight.double().T \
        + model.head.projection.bias.double() + batch["cur_xy"][:, -1].double()      # offset from the current place
    expected = z * torch.tensor([STATS["x_std"], STATS["y_std"]], dtype=torch.float64) \
        + torch.tensor([STATS["x_mean"], STATS["y_mean"]], dtype=torch.float64)
    torch.testing.assert_close(out.pred_xy.double(), expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# location experts and ranking head

def test_function_experts_see_x_and_y_separately():
    descriptions = torch.randn(5, 64)
    W = expert_weights_from_descriptions(descriptions, 128, seed=0)                  # (5, 128, 2)
    x_col, y_col = W[..., 0], W[..., 1]
    torch.testing.assert_close((x_col * y_col).sum(-1), torch.zeros(5), rtol=0, atol=1e-6)   # orthogonal
    torch.testing.assert_close(x_col.norm(dim=-1), y_col.norm(dim=-1))                # same length
    torch.testing.assert_close(x_col.pow(2).mean(-1).sqrt(), torch.full((5,), 1 / math.sqrt(6)))
    # different descriptions -> different experts; the projection of (1, 0) and (0, 1) differ (x + y bug absent)
    assert torch.cdist(x_col, x_col).triu(1)[torch.ones(5, 5).triu(1).bool()].min() > 0.1
    moe = LocationSemanticsMoE(descriptions, coord_dim=128)
    e = moe.expert_projections(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))              # (2, 5, 128)
    assert (e[0] - e[1]).abs().amax() > 0.1


@torch.no_grad()
def test_ranking_scores_are_not_linear_in_location_and_follow_function_labels():
    # collinear candidates: a score linear in (x, y) would put the middle one exactly at the ends' average
    xy = np.array([[-1000.0, 0.0], [0.0, 0.0], [1000.0, 0.0]])
    fn = np.array([0, 0, 0])
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="tiny", num_layers=2, pmoe_layers=(1,), use_prompt=False,
                                    head="ranking", ranking_id_embedding=False, ranking_pointer=False),
                        dict(x_mean=0.0, x_std=1000.0, y_mean=0.0, y_std=1000.0), xy, fn)
    scores = model.eval()(make_batch(B=8)).scores                                   # (8, 3)
    gap = scores[:, 1] - (scores[:, 0] + scores[:, 2]) / 2
    assert gap.abs().max() > 1e-3
    # changing one candidate's function label changes its embedding only
    before = model.candidate_location_embeddings().clone()
    model.head.candidate_function[2] = 4                   # (the origin projects to zero under every expert)
    after = model.candidate_location_embeddings()
    assert (after[2] - before[2]).abs().max() > 1e-3
    torch.testing.assert_close(after[:2], before[:2])


def test_ranking_loss_parts_match_a_brute_force_computation():
    model = make_model(head="ranking", ranking_distance_weight=0.01, ranking_entropy_weight=2.0)
    batch = make_batch(B=3)
    out = model(batch)
    loss, parts = model.loss(out, batch)
    xy, _ = candidates()
    scores = out.scores.detach().double()
    ce = expected_distance = 0.0
    for b in range(3):
        p = torch.softmax(scores[b], 0)
        ce += -math.log(p[batch["target_location"][b]]) / 3
        d = np.linalg.norm(xy - batch["target_xy"][b].double().numpy(), axis=1)
        expected_distance += float((p.numpy() * d).sum()) / 3
    entropy = np.mean([o.entropy.item() for o in out.personalized])
    # imbalance, from the gate probabilities directly: ln E - H(mean over the batch's tokens of the gate)
    imbalance = 0.0
    for o in out.personalized:
        mean = o.gate_probs.detach().double().reshape(-1, o.gate_probs.shape[-1]).mean(0).numpy()
        imbalance += (math.log(len(mean)) + float((mean * np.log(mean)).sum())) / len(out.personalized)
    assert float(parts["cross_entropy"]) == pytest.approx(ce, rel=1e-4)
    assert float(parts["expected_distance_m"]) == pytest.approx(expected_distance, rel=1e-4)
    assert float(parts["pmoe_imbalance"]) == pytest.approx(imbalance, rel=1e-4, abs=1e-7)
    beta = model.cfg.balance_weight
    assert loss.item() == pytest.approx(ce + 2.0 * (entropy + beta * imbalance) + 0.01 * expected_distance, rel=1e-4)


def test_routing_term_is_ln_e_minus_the_mutual_information_of_token_and_expert():
    from nextlocmoe.model.personalized_moe import routing_imbalance
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], [[0.3, 0.3, 0.4], [0.6, 0.3, 0.1]]])   # (B, T, E)
    tokens = probs.reshape(-1, 3).double()
    mean = tokens.mean(0)
    information = float(-(mean * mean.log()).sum() + (tokens * tokens.log()).sum(-1).mean())   # H(mean) - mean H
    entropy = float(-(tokens * tokens.log()).sum(-1).mean())
    assert entropy + float(routing_imbalance(probs)) == pytest.approx(math.log(3) - information, rel=1e-5)
    assert float(routing_imbalance(torch.full((2, 4, 5), 0.2))) == pytest.approx(0.0, abs=1e-6)
    one_expert = torch.zeros(2, 4, 5)
    one_expert[..., 3] = 1.0
    assert float(routing_imbalance(one_expert)) == pytest.approx(math.log(5), rel=1e-5)


@torch.no_grad()
def test_text_keys_come_from_the_frozen_embedding_table():
    backbone = load_backbone("tiny", 4)
    table = backbone.model.get_input_embeddings().weight
    pooled = torch.stack([table[backbone.tokenizer_encode(ROLE_DESCRIPTIONS[r])].mean(0) for r in ROLES])  # (11, D)

    raw = make_model(center_text_embeddings=False)
    for moe in raw.personalized_moe.values():
        torch.testing.assert_close(moe.role_keys, pooled)
    centred = make_model()
    expected = pooled - pooled.mean(0)
    expected = expected / expected.pow(2).mean().sqrt()
    for moe in centred.personalized_moe.values():
        torch.testing.assert_close(moe.role_keys, expected)
    # fewer role experts keep "Undefined"
    few = make_model(personalized=PersonalizedMoEConfig(num_experts=3))
    assert few.role_names == ("Student", "Teacher", "Undefined")
    assert next(iter(few.personalized_moe.values())).role_keys.shape == (3, 64)


def test_bad_inputs_raise_clear_errors():
    model = make_model()
    batch = make_batch()
    del batch["cur_hour"]
    with pytest.raises(DataError, match="cur_hour"):
        model(batch)
    with pytest.raises(DataError, match="x_std"):
        build_model(ModelConfig(backbone="tiny", num_layers=2, pmoe_layers=(1,)), dict(STATS, x_std=0.0))
    with pytest.raises(DataError, match="candidates_xy"):
        build_model(ModelConfig(backbone="tiny", num_layers=2, pmoe_layers=(1,)), STATS, np.zeros((4, 3)))
    with pytest.raises(ConfigError, match="ranking"):
        build_model(ModelConfig(backbone="tiny", num_layers=2, pmoe_layers=(1,), head="ranking"), STATS)
    with pytest.raises(ConfigError, match="pmoe_layers"):
        build_model(ModelConfig(backbone="tiny", num_layers=None, pmoe_layers=(6,)), STATS)


# ---------------------------------------------------------------------------------------------------------
# a short training run

@pytest.mark.parametrize("head", ["regression", "ranking"])
def test_smoke_training_reduces_the_loss(head):
    model = make_model(head=head, num_layers=2, pmoe_layers=(1,), tcn_channels=(32, 32))
    model.train()
    batch = make_batch(B=4, seed=3)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss, _ = model.loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


# ---------------------------------------------------------------------------------------------------------
# the real backbone

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_builds_and_runs():
    xy, fn = candidates()
    model = build_model(ModelConfig(backbone="smollm2", num_layers=12), STATS, xy, fn).eval()
    out = model(make_batch(B=2))
    assert out.pred_xy.shape == (2, 2) and torch.isfinite(out.pred_xy).all()
    assert len(out.personalized) == 2 and model.llama.config.hidden_size == 576
    counts = model.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pmoe, reads_history", [(True, True), (False, True), (True, False)])
def test_shared_prompt_prefix_equals_running_the_prompt_per_sample(attention, pmoe, reads_history):
    """run_backbone runs the prompt once per batch (before the first P-MoE layer, or through every layer when the
    prompt routes without h): the same outputs, routing, entropy and gradients as running it per sample."""
    model = use_attention(make_model(use_prompt=True, use_personalized_moe=pmoe, pmoe_layers=(1, 3),
                                     prompt_reads_history=reads_history), attention)
    model.train(False)
    batch = make_batch(B=3)
    results = []
    for share in (True, False):
        model.share_prompt_prefix = share
        model.zero_grad(set_to_none=True)
        out = model(batch)
        loss, _ = model.loss(out, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.pred_xy.detach(), grads, out.personalized))
    (pred_a, grads_a, moe_a), (pred_b, grads_b, moe_b) = results
    torch.testing.assert_close(pred_a, pred_b, rtol=1e-5, atol=1e-4)
    assert len(moe_a) == len(moe_b) == (2 if pmoe else 0)
    for a, b in zip(moe_a, moe_b):
        torch.testing.assert_close(a.gate_probs, b.gate_probs, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.selected, b.selected)
        if not reads_history:   # the prompt rows route alike in every sample, the trajectory rows do not
            P = model.prompt_length
            assert torch.equal(a.gate_probs[0, :P], a.gate_probs[2, :P])
            assert not torch.equal(a.gate_probs[0, P:], a.gate_probs[2, P:])
    assert grads_a.keys() == grads_b.keys() and any("norm" in n for n in grads_a)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-5, msg=name)


# --- the regression head starts at its floor -----------------------------------------------------------------

@torch.no_grad()
def test_untrained_offset_regression_head_predicts_the_current_place(tmp_path):
    """model.regression_origin=current: at step 0 the predicted point is the window's current record, so the
    median distance error equals the last_location baseline's (whose top-1 is the current place) and Hit@1 too;
    the paper's absolute head does not start there."""
    from nextlocmoe.baselines import LastLocation, evaluate_baseline
    from nextlocmoe.config import load_config
    from nextlocmoe.data.prepare import prepare
    from nextlocmoe.evaluation import evaluate

    cfg = load_config("smoke", overrides=["model.head=regression", "model.regression_origin=current"])
    windows = prepare(cfg.data, cache_dir=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    n = windows.n_windows("test")
    batch = {k: torch.as_tensor(v) for k, v in windows.batch("test", np.arange(n)).items()}
    last = windows.target_index("test") - 1                                          # the current record
    current_xy = np.stack([windows.x[last], windows.y[last]], axis=1)
    np.testing.assert_allclose(model(batch).pred_xy.double().numpy(), current_xy, atol=0.05)   # float32 metres
    ours = evaluate(model, windows, "test")
    floor = evaluate_baseline(LastLocation().fit(windows), windows, "test")
    assert ours["dist_median_m"] == pytest.approx(floor["dist_median_m"], abs=0.05)
    assert ours["hit@1"] == floor["hit@1"]
    absolute = build_model(dataclasses.replace(cfg.model, regression_offset=False), windows.stats,
                           windows.candidates, windows.candidate_function).eval()
    assert not np.allclose(absolute(batch).pred_xy.double().numpy(), current_xy, atol=1.0)


@torch.no_grad()
def test_untrained_regression_head_starts_at_the_tuned_scorers_top_place(tmp_path):
    """model.regression_origin=scorer (default): with its time prior the untrained head predicts, window by window,
    the coordinates of the place the tuned window_time scorer ranks first (float32 rounding of two near-equal sums
    may swap a window or two), so its Hit@1 is the scorer's and its median error at most last_location's; without
    the time prior it predicts the window's most frequent place (user_most_frequent's top-1)."""
    from nextlocmoe.baselines import LastLocation, UserMostFrequent, evaluate_baseline
    from nextlocmoe.config import load_config
    from nextlocmoe.data.prepare import prepare
    from nextlocmoe.evaluation import evaluate
    from nextlocmoe.window_scorers import make_scorer

    cfg = load_config("smoke", overrides=["model.head=regression"])
    assert cfg.model.regression_origin == "scorer"
    windows = prepare(cfg.data, cache_dir=tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg.model, windows.stats, windows.candidates, windows.candidate_function,
                        windows.history + windows.current).eval()
    n = windows.n_windows("test")
    raw = windows.batch("test", np.arange(n))
    batch = {k: torch.as_tensor(v) for k, v in raw.items()}
    frequent = UserMostFrequent().fit(windows)
    np.testing.assert_allclose(model(batch).pred_xy.double().numpy(),
                               windows.candidates[frequent.score(raw).argmax(1)], atol=0.05)   # no prior yet
    scorer = make_scorer("window_time").fit(windows)
    assert math.isfinite(scorer.weights.sigma)          # the time term is on: a real test of it
    model.set_time_prior(scorer.weights)
    top = scorer.score(raw).argmax(1)
    assert (top != frequent.score(raw).argmax(1)).sum() > 2      # the prior moves the origin of some windows
    pred = model(batch).pred_xy.double().numpy()
    at_top = np.abs(pred - windows.candidates[top]).max(1) < 0.05
    assert at_top.mean() >= 0.99 and (~at_top).sum() <= 2
    ours = evaluate(model, windows, "test")
    assert abs(ours["hit@1"] - evaluate_baseline(scorer, windows, "test")["hit@1"]) <= 2 / n
    assert ours["dist_median_m"] <= evaluate_baseline(LastLocation().fit(windows), windows, "test")["dist_median_m"]
    with pytest.raises(DataError, match="hist_location"):
        model({k: v for k, v in batch.items() if k != "hist_location"})
    shifted = windows.candidates + 1000.0        # another city's candidates (zero-shot): the origin follows them
    model.set_candidates(shifted, windows.candidate_function)
    np.testing.assert_allclose(model(batch).pred_xy.double().numpy()[at_top], shifted[top][at_top], atol=0.05)


@torch.no_grad()
def test_offset_scale_multiplies_the_displacement_only():
    """model.regression_offset_scale s: prediction = current place + s * (W q + b), in z units."""
    from nextlocmoe.model.heads import RegressionHead

    torch.manual_seed(0)
    state, origin = torch.randn(5, 8), torch.randn(5, 2)
    heads = {s: RegressionHead(8, STATS, offset=True, offset_scale=s) for s in (1.0, 0.01)}
    for head in heads.values():
        torch.nn.init.normal_(head.projection.weight, 0, 0.3)
        torch.nn.init.normal_(head.projection.bias, 0, 0.3)
        head.load_state_dict(heads[1.0].state_dict())
    scale = torch.tensor([STATS["x_std"], STATS["y_std"]], dtype=torch.float64)
    shift = torch.tensor([STATS["x_mean"], STATS["y_mean"]], dtype=torch.float64)
    here = origin.double() * scale + shift
    move = (state.double() @ heads[1.0].projection.weight.double().T + heads[1.0].projection.bias.double()) * scale
    for s, head in heads.items():
        torch.testing.assert_close(head(state, origin).double(), here + s * move, rtol=1e-5, atol=1e-2)


@torch.no_grad()
def test_checkpoints_carry_the_regression_origins_time_prior_but_train_no_such_parameter():
    """The origin's kappa, u, v are buffers (no gradient reaches them through the argmax, and DDP refuses
    parameters without one) that runs.stored_tensors stores beside the trainable parameters: a model loaded from
    a checkpoint has the time prior it was trained from."""
    from nextlocmoe.runs import load_trainable_state, stored_tensors, trainable_state
    from nextlocmoe.window_scorers import WindowWeights

    model = make_model()
    names = {"origin.hour_precision", "origin.same_weekday_bonus", "origin.same_daytype_bonus"}
    assert names <= set(stored_tensors(model))
    assert not names & {n for n, _ in model.named_parameters()}
    model.set_time_prior(WindowWeights(sigma=2.0, same_weekday=1.0, same_daytype=0.5))
    fresh = make_model()
    assert fresh.origin.hour_precision.item() == 0.0
    load_trainable_state(fresh, trainable_state(model))
    assert fresh.origin.hour_precision.item() == pytest.approx(1 / 8)
    assert fresh.origin.same_weekday_bonus.item() == pytest.approx(math.log(2))
    batch = make_batch(B=4)
    torch.testing.assert_close(fresh(batch).pred_xy, model(batch).pred_xy)
    assert not names & set(stored_tensors(make_model(regression_origin="current")))
