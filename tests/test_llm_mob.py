"""LLM-Mob-style baseline: answer parsing by hand cases and a naive reference, ranks against a brute-force
list position, prompts against the raw record arrays, evaluate against a scripted model whose right answers
are known, left-padded batches against one-at-a-time generation, and (slow) the real SmolLM2 on NYC."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nextlocmoe.data.config import DataConfig
from nextlocmoe.data.schema import MobilityData
from nextlocmoe.data.windows import make_windows
from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.llm_mob import (LLMMob, LLMMobConfig, TextCodec, batch_prompts, generation_throughput, miss_rank,
                                parse_ranked_ids, rank_answers, scores_from_ranked_ids)
from nextlocmoe.metrics import ranks_from_scores, retrieval_metrics

START = pd.Timestamp("2024-05-06 07:00")   # a Monday
VISIT = re.compile(r"\((\w{3}), (\d\d):00, (\d+)\)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_windows(n_locations: int = 300, n_users: int = 6, length: int = 24, seed: int = 0):
    """Random visits 1-3 hours apart (so weekdays change), ids of 1 to 3 digits, 4 + 2 -> next windows."""
    rng = np.random.default_rng(seed)
    loc = pd.DataFrame({"x": rng.uniform(-5000, 5000, n_locations), "y": rng.uniform(-5000, 5000, n_locations),
                        "lat": np.nan, "lon": np.nan, "function": "Unknown",
                        "name": [f"p{i}" for i in range(n_locations)]})
    frames = []
    for user in range(n_users):
        ids = rng.integers(0, n_locations, length)
        t = START + pd.to_timedelta(np.cumsum(rng.integers(1, 4, length)) * 3 + 5 * user, "h")
        frames.append(pd.DataFrame({"user": user, "timestamp": t, "x": loc.x.to_numpy()[ids],
                                    "y": loc.y.to_numpy()[ids], "lat": np.nan, "lon": np.nan,
                                    "location": ids, "function": "Unknown"}))
    rec = pd.concat(frames, ignore_index=True)
    rec["timestamp"] = rec["timestamp"].astype("datetime64[ns]")
    data = MobilityData(name="toy", records=rec, locations=loc, source="generated", checksum=f"toy{seed}")
    cfg = DataConfig(source="synthetic", history=4, current=2, stride=1, keep_every=1, gap_hours=24.0,
                     min_segment=3, split="chronological", seed=0).resolved()
    return make_windows(data, cfg)


def plain_cfg(**overrides) -> LLMMobConfig:
    """No chat template (the byte codec has none), no progress bar."""
    return LLMMobConfig(**{"use_chat_template": False, "progress": False, **overrides})


# ---------------------------------------------------------------------------------------------------
# parsing

@pytest.mark.parametrize("text, truncated, expected", [
    ("[12, 7, 30]", False, [12, 7, 30]),
    ("[0]", False, [0]),                                     # id 0 is a place
    ("[5, 150, 7, 100]", False, [5, 7]),                     # L = 100: 150 and 100 are out of range
    ("[4, 4, 9, 4, 9]", False, [4, 9]),                      # repeats keep their first position
    ("I cannot tell where they go.", False, []),             # garbage: unparsable
    ("[]", False, []),
    ("[-3, 2.5, 8]", False, [8]),                            # negative and fractional are not ids
    ("[(Tue, 12:00, 42), (Wed, 09:30, 17)]", False, [42, 17]),  # echoed visits: clock times skipped
    ("At 14 they leave: [3, 9] or maybe 5", False, [3, 9]),  # only the list counts when there is one
    ("place 17, then 23", False, [17, 23]),                  # no list: every number counts
    ("[1, 2, 3", True, [1, 2]),                              # cut by the token limit: 3 may be 3xx
    ("[1, 2, 3", False, [1, 2, 3]),                          # ended normally: 3 is complete
    ("[1, 2, 3]", True, [1, 2, 3]),                          # closed list: nothing cut
    ("[1, 2, 3] and", True, [1, 2, 3]),
    ("77", True, []),                                        # a lone number cut short: unparsable
])
def test_parse_hand_cases(text, truncated, expected):
    assert parse_ranked_ids(text, n_locations=100, top_k=10, truncated=truncated) == expected


def test_parse_keeps_at_most_top_k():
    assert parse_ranked_ids("[8, 8, 1, 2, 3, 4]", n_locations=10, top_k=3) == [8, 1, 2]
    assert parse_ranked_ids("[8, 1, 2, 3, 4]", n_locations=10, top_k=None) == [8, 1, 2, 3, 4]


def test_parse_matches_naive_filter_on_random_lists():
    rng = np.random.default_rng(3)
    for _ in range(200):
        values = rng.integers(-20, 140, rng.integers(0, 15)).tolist()
        text = "[" + ", ".join(map(str, values)) + "]"
        naive = []
        for v in values:
            if 0 <= v < 100 and v not in naive and len(naive) < 10:
                naive.append(v)
        assert parse_ranked_ids(text, n_locations=100, top_k=10) == naive


def test_parse_rejects_empty_candidate_set():
    with pytest.raises(ConfigError, match="n_locations"):
        parse_ranked_ids("[1]", n_locations=0)


# ---------------------------------------------------------------------------------------------------
# ranked list -> scores -> ranks

def test_scores_from_ranked_ids_give_list_positions_under_ranks_from_scores():
    rng = np.random.default_rng(0)
    n_locations = 40
    lists = [rng.choice(n_locations, size=m, replace=False).tolist() for m in (0, 1, 3, 10, 10, 7)]
    scores = scores_from_ranked_ids(lists, n_locations)                       # (6, L)
    for row, ranked in enumerate(lists):
        targets = np.arange(n_locations)
        ranks = ranks_from_scores(np.repeat(scores[row:row + 1], n_locations, axis=0), targets)
        for place in range(n_locations):
            if place in ranked:
                assert ranks[place] == ranked.index(place) + 1              # brute force: position in list
            else:
                assert ranks[place] > len(ranked)                           # after every listed place
        ours = rank_answers([ranked] * n_locations, targets, np.zeros((n_locations, 2))).rank
        expected = [ranked.index(p) + 1 if p in ranked else n_locations + 1 for p in range(n_locations)]
        assert ours.tolist() == expected
        if ranked:
            assert scores[row].argmax() == ranked[0]                         # top-1 = first listed


def test_misses_rank_after_every_candidate():
    candidates = np.arange(10.0).reshape(5, 2)
    answers = rank_answers([[], [2, 1], [0]], np.array([3, 1, 4]), candidates)
    ranks = answers.rank
    assert answers.top1[1:].tolist() == [2, 0]                                 # the first listed place
    np.testing.assert_allclose(answers.error_m[1:], [np.hypot(2, 2), np.hypot(8, 8)])
    assert ranks.tolist() == [miss_rank(5), 2, miss_rank(5)]
    metrics = retrieval_metrics(ranks, ks=(1, 2, 5))                          # k = L = 5: misses still miss
    assert metrics["hit@5"] == pytest.approx(1 / 3) and metrics["hit@2"] == pytest.approx(1 / 3)
    assert metrics["hit@1"] == 0.0
    assert metrics["mrr"] == pytest.approx((1 / 6 + 1 / 2 + 1 / 6) / 3)


def test_scores_from_ranked_ids_rejects_bad_lists():
    with pytest.raises(DataError, match="distinct ids"):
        scores_from_ranked_ids([[1, 1]], 5)
    with pytest.raises(DataError, match="distinct ids"):
        scores_from_ranked_ids([[7]], 5)


# ---------------------------------------------------------------------------------------------------
# prompts

def section(prompt: str, header_start: str) -> list[tuple[str, int, int]]:
    """Visits listed in the prompt block whose header starts with `header_start`."""
    block = next(b for b in prompt.split("\n\n") if b.startswith(header_start))
    return [(d, int(h), int(p)) for d, h, p in VISIT.findall(block)]


@pytest.mark.parametrize("max_history", [40, 2, 0])
def test_prompt_lists_exactly_the_window_in_order(max_history):
    w = toy_windows()
    codec = TextCodec.bytes(512)
    cfg = plain_cfg(max_history=max_history)
    idx = np.arange(w.n_windows("test"))
    prompts = batch_prompts(w.batch("test", idx), codec, cfg)
    for prompt, start in zip(prompts, w.starts["test"]):
        H, C = w.history, w.current
        # independent truth from the flat record arrays and raw timestamps (not Windows.weekday/hour)
        def truth(rows):
            stamps = pd.to_datetime(w.timestamp[rows])
            return [(s.day_name()[:3], s.hour, int(w.location[r])) for s, r in zip(stamps, rows)]
        shown = min(max_history, H)
        history_rows = np.arange(start + H - shown, start + H)
        current_rows = np.arange(start + H, start + H + C)
        if shown:
            assert section(prompt, "Earlier visits") == truth(history_rows)
        else:
            assert "Earlier visits" not in prompt
        assert section(prompt, "Latest visits") == truth(current_rows)
        assert len(VISIT.findall(prompt)) == shown + C                    # nothing else looks like a visit
        assert prompt.endswith("Answer: [")


def test_chat_template_is_required_when_asked():
    w = toy_windows()
    with pytest.raises(ConfigError, match="use_chat_template"):
        batch_prompts(w.batch("test", [0]), TextCodec.bytes(512), LLMMobConfig())


def test_chat_template_wraps_the_messages():
    w = toy_windows()
    seen = []
    codec = TextCodec.bytes(512)

    def chat(messages):
        seen.append(messages)
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<bot>"
    codec.chat = chat
    prompt = batch_prompts(w.batch("test", [0]), codec, LLMMobConfig(answer_prefix=""))[0]
    assert [m["role"] for m in seen[0]] == ["system", "user"]
    assert prompt.startswith("<system>") and prompt.endswith("<bot>")


@pytest.mark.parametrize("field, value", [("max_history", -1), ("top_k", 0), ("max_new_tokens", 0),
                                          ("batch_size", 0), ("max_samples", 0), ("temperature", 0.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"llm_mob.{field}"):
        LLMMobConfig(**{field: value}).validate()


# ---------------------------------------------------------------------------------------------------
# evaluate against a scripted model with known answers

class ScriptedModel(nn.Module):
    """Reads each prompt back, checks the left padding, and replies with the answer scripted for that prompt
    (then the end token, then pads, as `generate` does). Unscripted prompts get "no idea"."""

    def __init__(self, codec: TextCodec, script: dict[str, str] | None = None):
        super().__init__()
        self.codec = codec
        self.script = script or {}
        self.anchor = nn.Parameter(torch.zeros(1))      # gives the module a device
        self.batch_sizes = []

    def generate(self, input_ids, attention_mask, generation_config=None, **_):
        answers = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            n_pad = mask.index(1)
            assert mask == [0] * n_pad + [1] * (len(mask) - n_pad)          # padding only on the left
            assert ids[:n_pad] == [self.codec.pad_id] * n_pad
            text = self.script.get(self.codec.decode(ids[n_pad:]), "no idea")
            answers.append(self.codec.encode(text) + [self.codec.eos_ids[0]])
        longest = max(map(len, answers))
        self.batch_sizes.append(len(answers))
        return torch.tensor([ids + answer + [self.codec.pad_id] * (longest - len(answer))
                             for ids, answer in zip(input_ids.tolist(), answers)])


def test_evaluate_counts_unparsable_and_scores_the_scripted_answers():
    w = toy_windows()
    codec = TextCodec.bytes(512)
    cfg = plain_cfg(batch_size=4, max_samples=None)
    batch = w.batch("test", np.arange(w.n_windows("test")))
    prompts = batch_prompts(batch, codec, cfg)
    target = batch["target_location"]
    L = w.n_locations
    wrong, wrong2 = (target + 1) % L, (target + 2) % L
    # window i gets one of five kinds of answer (the prompt already ends with the "[" prefix)
    kind = np.arange(len(target)) % 5
    answer = {0: lambda i: f"{target[i]}, {wrong[i]}]",                         # right first: rank 1
              1: lambda i: f"{wrong[i]}, {wrong[i]}, {wrong2[i]}, {target[i]}]",  # repeat, right third: rank 3
              2: lambda i: f"{wrong[i]}]",                                      # named but wrong: miss
              3: lambda i: "I am not sure.]",                                   # unparsable
              4: lambda i: f"{L + 5}, -{target[i]}]"}                           # only invalid ids: unparsable
    script = {p: answer[k](i) for i, (p, k) in enumerate(zip(prompts, kind))}
    model = ScriptedModel(codec, script)
    metrics = LLMMob(model, codec).evaluate(w, "test", cfg)
    n = len(target)
    assert metrics["n"] == n and model.batch_sizes[0] == 4
    assert metrics["unparsable"] == int(np.isin(kind, (3, 4)).sum())
    assert metrics["unparsable_fraction"] == pytest.approx(np.isin(kind, (3, 4)).mean())
    assert metrics["hit@1"] == pytest.approx(np.mean(kind == 0))
    assert metrics["hit@5"] == pytest.approx(np.mean(kind <= 1))
    assert metrics["ndcg@5"] == pytest.approx(np.mean(np.where(kind == 0, 1.0, np.where(kind == 1, 0.5, 0))))
    expected_mrr = np.mean(np.where(kind == 0, 1.0, np.where(kind == 1, 1 / 3, 1.0 / (L + 1))))
    assert metrics["mrr"] == pytest.approx(expected_mrr)
    parsed = kind <= 2
    top1 = np.where(kind == 0, target, wrong)[parsed]
    errors = np.hypot(*(w.candidates[top1] - batch["target_xy"][parsed]).T)
    assert metrics["dist_n"] == int(parsed.sum())
    assert metrics["dist_mean_m"] == pytest.approx(errors.mean(), rel=1e-6)
    assert metrics["listed_mean"] == pytest.approx(np.mean(np.select([kind == 0, kind == 1, kind == 2], [2, 3, 1], 0)))
    assert metrics["truncated_fraction"] == 0.0
    assert metrics["prompt_tokens_mean"] == pytest.approx(np.mean([len(p.encode()) for p in prompts]))
    assert metrics["seconds_per_sample"] > 0


def test_evaluate_respects_the_sample_budget():
    w = toy_windows()
    codec = TextCodec.bytes(512)
    metrics = LLMMob(ScriptedModel(codec), codec).evaluate(w, "test", plain_cfg(max_samples=5, batch_size=2))
    assert metrics["n"] == 5


# ---------------------------------------------------------------------------------------------------
# real generation with the tiny random backbone

@pytest.fixture(scope="module")
def tiny_mob():
    """Tiny random LLaMA with widened weights, so its answers depend on the prompt (std 0.02 barely does)."""
    mob = LLMMob.from_backbone("tiny", num_layers=2, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in mob.model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return mob


def test_left_padded_batch_equals_one_prompt_at_a_time(tiny_mob):
    cfg = plain_cfg(max_new_tokens=6)
    prompts = ["(Mon, 08:00, 1)", "(Tue, 17:00, 12345) then (Wed, 09:00, 88)", "x", "[3, 4, 5] and more text here"]
    batched = tiny_mob.generate(prompts, cfg)
    alone = [tiny_mob.generate([p], cfg)[0] for p in prompts]
    assert batched == alone
    assert len({a.text for a in alone}) > 1                # the answers do depend on the prompt
    assert [a.prompt_tokens for a in batched] == [len(p.encode()) for p in prompts]


def test_evaluate_with_tiny_backbone_is_deterministic_and_counts_what_it_parses(tiny_mob):
    w = toy_windows()
    cfg = plain_cfg(max_new_tokens=8, batch_size=3, max_samples=6, answer_prefix="")
    first = tiny_mob.evaluate(w, "test", cfg)
    second = tiny_mob.evaluate(w, "test", cfg)
    first.pop("seconds_per_sample"), second.pop("seconds_per_sample")
    assert first == second
    sub = w.subsample("test", 6, cfg.seed)
    predictions = [p for s in (0, 3) for p in tiny_mob.predict(sub, "test", np.arange(s, s + 3), cfg)]
    parsed = [parse_ranked_ids(p.answer.text, w.n_locations, cfg.top_k, p.answer.truncated) for p in predictions]
    assert first["unparsable"] == sum(not r for r in parsed)
    assert first["n"] == 6 and first["new_tokens_mean"] <= 8


def test_prompt_longer_than_the_model_is_a_config_error(tiny_mob):
    with pytest.raises(ConfigError, match="max_history"):
        tiny_mob.generate(["z" * 1020], plain_cfg(max_new_tokens=10))


def test_generation_throughput_rows(tiny_mob):
    rows = generation_throughput(tiny_mob.model, tiny_mob.codec, prompt_tokens=16, new_tokens=4,
                                 batch_sizes=[1, 3], device="cpu", repeats=2, warmup=1, progress=False)
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        assert r["samples_per_s"] == pytest.approx(r["batch_size"] / r["seconds_per_batch"])
        assert r["new_tokens"] == 4 and r["seconds_per_batch"] > 0
    with pytest.raises(ConfigError, match="batch_sizes"):
        generation_throughput(tiny_mob.model, None, 16, 4, [0])


# ---------------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct on two NYC windows

@pytest.mark.slow
def test_smollm2_on_two_nyc_windows():
    from nextlocmoe.data.prepare import prepare
    from nextlocmoe.llm_mob import smollm2_tokenizer

    windows = prepare(DataConfig())
    mob = LLMMob.from_backbone("smollm2")
    assert mob.model.config.num_hidden_layers == 30
    tokenizer = smollm2_tokenizer()
    prompt = batch_prompts(windows.batch("test", [0]), mob.codec, LLMMobConfig())[0]
    ids = mob.codec.encode(prompt)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3   # system, user, assistant turns
    metrics = mob.evaluate(windows, "test", LLMMobConfig(max_samples=2, batch_size=2, progress=False))
    assert metrics["n"] == 2 and 500 < metrics["prompt_tokens_mean"] < 1500
    assert 0 <= metrics["unparsable"] <= 2
