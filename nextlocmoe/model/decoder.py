"""The decoder runner: the frozen LLaMA layers in our own loop, so that chosen layers' FFN is a Personalized MoE.

    tokens (B, T, D) = [prompt (P) ; history (H) ; current (C)], h (B, 176)
        for each decoder layer i:
            x = x + self_attn(input_layernorm(x))                 transformers' attention, rotary, causal mask
            x = x + FFN_i(post_attention_layernorm(x))            FFN_i = PersonalizedMoE(., h) at the P-MoE layers
        -> hidden states (B, T, D) BEFORE the final norm, and one MoEOutput per P-MoE layer

Layers without a P-MoE are called whole (`LlamaDecoderLayer.forward`); a P-MoE layer is spelled out as the
two residual blocks above, the only way to hand h to its FFN.

Shared prompt prefix (`run_decoder(..., share_prompt_prefix=True)`). The prompt tokens attend only to each
other (causal mask), so until something specific to a sample reaches them their hidden states are the same
for every sample. We then run the prompt once (batch 1), cache its keys/values (`PrefixCache`), and let the
trajectory tokens attend to them: the same function (tested against the plain loop), at H + C instead of
P + H + C tokens per sample in those layers.
  * prompt_reads_history=True (paper): the prompt tokens' P-MoE gates read the sample's h, so the prompt is
    shared only up to the first P-MoE layer (SmolLM2, P-MoE at 8: 8 of 12 layers);
  * prompt_reads_history=False (ours, docs/design.md §5.2): the prompt tokens route with h = 0, the prompt is
    the same for every sample through ALL layers and one prompt cache serves the batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .personalized_moe import MoEOutput, PersonalizedMoE, concat_moe_outputs


def causal_attention_mask(config, inputs_embeds: torch.Tensor, position_ids: torch.Tensor):
    """transformers' own causal mask for this config's attention implementation (None means sdpa's is_causal).

    The helper's keywords changed across transformers versions (input_embeds -> inputs_embeds, cache_position
    dropped); we pass whichever this version takes.
    """
    params = inspect.signature(create_causal_mask).parameters
    kwargs: dict[str, Any] = dict(config=config, attention_mask=None, past_key_values=None, position_ids=position_ids)
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    if "cache_position" in params:
        kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return create_causal_mask(**kwargs)


class PrefixCache:
    """The smallest cache transformers' attention accepts: `update(keys, values, layer_idx)`.

    While `recording`, it stores the prompt's keys/values of each layer (batch 1) and returns them unchanged;
    afterwards it returns them prepended, broadcast over the batch, to the trajectory's own keys/values.
    """

    def __init__(self) -> None:
        self.recording = True
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.layers[layer_idx] = (keys, values)                                     # (1, kv_heads, P, hd)
            return keys, values
        prompt_keys, prompt_values = self.layers[layer_idx]
        B = keys.shape[0]
        return (torch.cat([prompt_keys.expand(B, -1, -1, -1), keys], dim=2),          # (B, kv_heads, P + S, hd)
                torch.cat([prompt_values.expand(B, -1, -1, -1), values], dim=2))


def _layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states, whether this transformers version returns a tuple or a tensor."""
    return out[0] if isinstance(out, tuple) else out


def shared_prefix_layers(num_layers: int, pmoe_layers: list[int], prompt_length: int,
                         prompt_reads_history: bool) -> int:
    """How many leading layers can run the prompt once per batch (module docstring): 0 without a prompt, up to
    the first P-MoE layer when the prompt reads h, every layer when it does not."""
    if not prompt_length:
        return 0
    if prompt_reads_history:
        return min(pmoe_layers, default=num_layers)
    return num_layers


def personalized_ffn(moe: PersonalizedMoE, hidden: torch.Tensor, history: torch.Tensor, prompt_length: int,
                     prompt_reads_history: bool) -> MoEOutput:
    """The P-MoE on (B, T, D) FFN inputs; with prompt_reads_history=False the first P (prompt) tokens route
    with h = 0 and the rest with the sample's h."""
    P = prompt_length
    if not P or prompt_reads_history:
        return moe(hidden, history.to(hidden.dtype))
    B = hidden.shape[0]
    prompt = moe(hidden[:, :P], history.new_zeros(B, history.shape[-1]).to(hidden.dtype))
    return concat_moe_outputs(prompt, moe(hidden[:, P:], history.to(hidden.dtype)))


def run_decoder(llama: nn.Module, personalized_moe: nn.ModuleDict, tokens: torch.Tensor, history: torch.Tensor,
                prompt_length: int, prompt_reads_history: bool,
                share_prompt_prefix: bool = True) -> tuple[torch.Tensor, list[MoEOutput]]:
    """(B, T, D) input embeddings, h (B, 176) -> hidden states (B, T, D) BEFORE the final norm, P-MoE outputs.

    llama             transformers' LlamaModel (its `layers` and `rotary_emb` are used; the final norm is not)
    personalized_moe  layer index (str) -> PersonalizedMoE replacing that layer's FFN
    tokens            input embeddings, already in the backbone's dtype
    prompt_length     P, the number of leading prompt tokens (0 without a prompt)
    The prompt prefix is shared when `share_prompt_prefix` and B > 1 (module docstring); with several
    processes the returned prompt rows are then the broadcast batch-1 states.
    """
    x = tokens
    B, T, _ = x.shape
    P = prompt_length
    shared = shared_prefix_layers(len(llama.layers), [int(i) for i in personalized_moe], P, prompt_reads_history)
    personalized: list[MoEOutput] = []
    if shared > 0 and B > 1 and share_prompt_prefix:
        x, personalized = _run_shared_prefix(llama, personalized_moe, x, P, shared, history)  # (B, T, D)
    else:
        shared = 0
    position_ids = torch.arange(T, device=x.device)[None]                              # (1, T)
    position_embeddings = llama.rotary_emb(x, position_ids=position_ids)               # (cos, sin), each (1, T, hd)
    mask = causal_attention_mask(llama.config, x, position_ids)
    for i, layer in enumerate(llama.layers):
        if i < shared:
            continue
        moe = personalized_moe[str(i)] if str(i) in personalized_moe else None
        if moe is None:
            x = _layer_output(layer(x, attention_mask=mask, position_ids=position_ids,
                                    position_embeddings=position_embeddings))
            continue
        # the decoder layer, spelled out so the FFN can be the Personalized MoE reading h
        attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=mask,
                                       position_ids=position_ids, position_embeddings=position_embeddings)
        x = x + attention                                                               # (B, T, D)
        moe_out = personalized_ffn(moe, layer.post_attention_layernorm(x), history, P, prompt_reads_history)
        x = x + moe_out.output                                                          # (B, T, D)
        personalized.append(moe_out)
    return x, personalized


def _run_shared_prefix(llama: nn.Module, personalized_moe: nn.ModuleDict, x: torch.Tensor, P: int, shared: int,
                       history: torch.Tensor) -> tuple[torch.Tensor, list[MoEOutput]]:
    """Layers [0, shared): the prompt x[:1, :P] once, the trajectory x[:, P:] attending to its keys/values.

    A P-MoE layer among them (prompt_reads_history=False only) runs the prompt's FFN with h = 0 and the
    trajectory's with the sample's h; its MoEOutput covers all P + S tokens, the prompt rows broadcast.
    """
    B, T, _ = x.shape
    S = T - P
    prompt, trajectory = x[:1, :P], x[:, P:]                                            # (1, P, D), (B, S, D)
    pos_p = torch.arange(P, device=x.device)[None]                                      # (1, P)
    pos_s = torch.arange(P, T, device=x.device)[None]                                   # (1, S)
    rope_p = llama.rotary_emb(prompt, position_ids=pos_p)
    rope_s = llama.rotary_emb(trajectory, position_ids=pos_s)
    full_mask = causal_attention_mask(llama.config, x[:1], torch.arange(T, device=x.device)[None])
    mask_p = None if full_mask is None else full_mask[..., :P, :P]
    if full_mask is None:   # sdpa's implicit causal mask: build the rectangular one (query j sees keys <= P + j)
        mask_s = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=P)[None, None]  # (1, 1, S, T)
    else:
        mask_s = full_mask[..., P:, :]                                                  # (1, 1, S, T)
    cache = PrefixCache()
    personalized = []
    for i, layer in enumerate(llama.layers[:shared]):
        moe = personalized_moe[str(i)] if str(i) in personalized_moe else None
        if moe is None:
            cache.recording = True
            prompt = _layer_output(layer(prompt, attention_mask=mask_p, position_ids=pos_p, position_embeddings=rope_p,
                                         past_key_values=cache))
            cache.recording = False
            trajectory = _layer_output(layer(trajectory, attention_mask=mask_s, position_ids=pos_s,
                                             position_embeddings=rope_s, past_key_values=cache))
            continue
        cache.recording = True
        attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(prompt), attention_mask=mask_p,
                                       position_ids=pos_p, position_embeddings=rope_p, past_key_values=cache)
        prompt = prompt + attention                                                      # (1, P, D)
        cache.recording = False
        attention, _ = layer.self_attn(hidden_states=layer.input_layernorm(trajectory), attention_mask=mask_s,
                                       position_ids=pos_s, position_embeddings=rope_s, past_key_values=cache)
        trajectory = trajectory + attention                                              # (B, S, D)
        zero_h = history.new_zeros(1, history.shape[-1]).to(prompt.dtype)
        moe_p = moe(layer.post_attention_layernorm(prompt), zero_h)
        moe_s = moe(layer.post_attention_layernorm(trajectory), history.to(trajectory.dtype))
        prompt, trajectory = prompt + moe_p.output, trajectory + moe_s.output
        personalized.append(concat_moe_outputs(moe_p, moe_s))
    return torch.cat([prompt.expand(B, -1, -1), trajectory], dim=1), personalized      # (B, T, D)
