"""The compact export of the truncated SmolLM2 backbone equals what transformers' GGUF loader builds.

Fast tests check the numpy Q4_1 dequantiser against `gguf`'s and against a one-weight-at-a-time reading of the
block layout. The two slow tests read the real 98 MB GGUF: one compares real blocks, the other exports 12 layers
and checks weights, hidden states and prompt embeddings against `load_backbone("smollm2", 12)`.
"""

import numpy as np
import pytest
import torch

from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.model.backbone import embed_tokens, load_backbone
from nextlocmoe.model.compact import MANIFEST_NAME, WEIGHTS_NAME, dequantize_q4_1, export_compact, load_compact
from nextlocmoe.model.texts import ROLE_DESCRIPTIONS, TASK_PROMPT

gguf = pytest.importorskip("gguf")
torch.set_num_threads(1)


def naive_q4_1(raw: np.ndarray) -> np.ndarray:
    """Independent reading of the ggml Q4_1 layout, one block and one weight at a time (python floats)."""
    out = []
    for block in raw.reshape(-1, 20):
        d = float(np.frombuffer(block[0:2].tobytes(), dtype=np.float16)[0])
        m = float(np.frombuffer(block[2:4].tobytes(), dtype=np.float16)[0])
        codes = [int(b) & 0xF for b in block[4:]] + [int(b) >> 4 for b in block[4:]]
        out.extend(d * q + m for q in codes)
    return np.array(out).reshape(raw.shape[:-1] + (raw.shape[-1] // 20 * 32,))


def test_dequantize_q4_1_matches_gguf_on_random_blocks():
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(7, 96)).astype(np.float32) * rng.uniform(0.01, 3, size=(7, 1)).astype(np.float32)
    weights[3] = 0.25                                       # a constant row: scale 0
    raw = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)   # (7, 60) bytes
    ours = dequantize_q4_1(raw)
    reference = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
    assert ours.dtype == np.float32 and ours.shape == (7, 96)
    assert np.array_equal(ours, reference)                  # bit for bit
    np.testing.assert_allclose(ours, naive_q4_1(raw), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours, weights, atol=np.abs(weights).max() / 7)   # a sane 4-bit reconstruction


def test_dequantize_q4_1_random_bytes_and_bad_width():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(3, 2, 40), dtype=np.uint8)
    scales = rng.uniform(-2, 2, size=(3, 2, 2, 2)).astype(np.float16).view(np.uint8)   # finite fp16 d and m
    raw.reshape(3, 2, 2, 20)[..., :4] = scales.reshape(3, 2, 2, 4)
    ours = dequantize_q4_1(raw)
    assert ours.shape == (3, 2, 64)
    assert np.array_equal(ours.reshape(-1, 64), gguf.quants.dequantize(raw.reshape(-1, 40),
                                                                        gguf.GGMLQuantizationType.Q4_1))
    np.testing.assert_allclose(ours, naive_q4_1(raw), rtol=1e-6, atol=1e-6)
    with pytest.raises(DataError, match="multiple of the 20-byte"):
        dequantize_q4_1(raw[..., :30])


def test_missing_compact_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=MANIFEST_NAME):
        load_backbone(f"compact:{tmp_path / 'nowhere'}", 12)


# ----------------------------------------------------------------------------------------------------------
# the real GGUF

@pytest.mark.slow
def test_dequantize_q4_1_matches_gguf_on_real_blocks():
    from nextlocmoe.model.backbone import smollm2_gguf_path
    reader = gguf.GGUFReader(smollm2_gguf_path())
    checked = 0
    for tensor in reader.tensors:
        if tensor.tensor_type == gguf.GGMLQuantizationType.Q4_1 and tensor.name.startswith(("blk.0.", "blk.29.")):
            raw = np.asarray(tensor.data)
            assert np.array_equal(dequantize_q4_1(raw), gguf.quants.dequantize(raw, tensor.tensor_type)), tensor.name
            checked += 1
    assert checked == 14                                    # 7 quantised matrices per layer, two layers
    np.testing.assert_allclose(dequantize_q4_1(raw[:2]), naive_q4_1(raw[:2]), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compact_export_equals_transformers_gguf_loader(tmp_path):
    manifest = export_compact(tmp_path / "compact", num_layers=12)
    size = sum(p.stat().st_size for p in manifest.parent.iterdir())
    assert size < 40e6, f"export is {size / 1e6:.1f} MB"
    assert (manifest.parent / WEIGHTS_NAME).is_file()

    compact = load_backbone(f"compact:{manifest.parent}", 12)           # through the load_backbone hook
    reference = load_backbone("smollm2", 12)                            # transformers' GGUF loader (cached)
    assert compact.source == "compact" and compact.num_layers == 12 and compact.num_layers_full == 30

    # every decoder weight and norm is bit-identical
    ours, theirs = compact.model.state_dict(), reference.model.state_dict()
    for name, tensor in theirs.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        assert torch.equal(ours[name], tensor), name

    # the same hidden states (final norm applied) on random input embeddings
    torch.manual_seed(0)
    inputs = torch.randn(2, 17, compact.hidden_size)                    # (B, T, D)
    with torch.no_grad():
        h_ours = compact.model.model(inputs_embeds=inputs).last_hidden_state       # (B, T, D)
        h_theirs = reference.model.model(inputs_embeds=inputs).last_hidden_state   # (B, T, D)
    torch.testing.assert_close(h_ours, h_theirs, rtol=1e-5, atol=1e-5)

    # the same token ids and embedding rows for the texts
    assert compact.tokenizer_encode(TASK_PROMPT) == reference.tokenizer_encode(TASK_PROMPT)
    assert torch.equal(embed_tokens(compact, TASK_PROMPT), embed_tokens(reference, TASK_PROMPT))
    role = ROLE_DESCRIPTIONS["Undefined"]
    assert torch.equal(embed_tokens(compact, role), embed_tokens(reference, role))

    # a shallower load from the same export; texts that were not exported; too many layers
    assert load_compact(manifest, num_layers=4).num_layers == 4
    with pytest.raises(ConfigError, match="was not exported"):
        compact.tokenizer_encode("a text nobody exported")
    with pytest.raises(ConfigError, match=r"num_layers=13"):
        load_compact(manifest.parent, num_layers=13)


@pytest.mark.slow
def test_smollm2_shape_stand_in_has_the_gguf_shapes():
    """The random stand-in that times LLM-Mob generation where only the compact export travels has exactly the
    shapes of the real SmolLM2 (read from the GGUF header, not from our table)."""
    from pathlib import Path

    from nextlocmoe.model.backbone import random_backbone_config, smollm2_gguf_path
    from nextlocmoe.model.compact import _truncated_config

    real, full = _truncated_config(Path(smollm2_gguf_path()), 30)
    ours = random_backbone_config("smollm2-shape")
    assert full == ours.num_hidden_layers == 30
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(ours, field) == pytest.approx(getattr(real, field), rel=1e-6), field

    def rope_theta(config):   # newer transformers keep it in rope_parameters
        return getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    assert rope_theta(ours) == pytest.approx(rope_theta(real), rel=1e-6)


def test_llm_mob_uses_the_stand_in_and_skips_accuracy_for_a_compact_backbone():
    from nextlocmoe.experiments import COMPACT_STAND_IN, LLMMobRunner, Runner

    runner = Runner("zero_shot", "smoke", overrides=["model.backbone=compact:.carry/smollm2-12"])
    mob = LLMMobRunner(runner)
    assert mob.backbone == COMPACT_STAND_IN and not mob.answers_meaningfully
    plain = LLMMobRunner(Runner("zero_shot", "smoke"))
    assert plain.backbone == "tiny" and plain.answers_meaningfully
