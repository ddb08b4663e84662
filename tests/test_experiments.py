"""Experiment runner on the smoke profile (tiny backbone, tiny synthetic city): the one profile table, results
files and provenance, caching (hit, force, changed config), tidy tables, the method registry, the zero-shot region
split against a brute-force recomputation, the ablation head choice, efficiency figures, the CLI.
(The NextLocLLM-style model's peft LoRA is tested in test_peft_lora.py.)"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

import nextlocmoe.experiments as experiments
from nextlocmoe.cli import main
from nextlocmoe.config import PROFILES, load_config
from nextlocmoe.data.config import DataConfig, SyntheticConfig
from nextlocmoe.data.sources import load_records
from nextlocmoe.data.synthetic import generate_city, write_humob_csv
from nextlocmoe.errors import ConfigError
from nextlocmoe.config import config_hash
from nextlocmoe.experiments import (Method, Runner, ablation_variants, backbone_overhead, get_method, home_regions,
                                    methods, register_method, resolve_config, run_config, run_experiment,
                                    unregister_method)
from nextlocmoe.results import ID_COLUMNS
from nextlocmoe.model import ModelConfig, load_backbone
from nextlocmoe.model.backbone import randomly_initialised

torch.set_num_threads(1)

pytestmark = pytest.mark.slow      # end to end: experiments train and evaluate models (make test-fast skips)

SUPERVISED_METHODS = tuple(m.name for m in methods(supervised=True))
METHOD_KIND = {m.name: m.kind for m in methods()}
SMOKE = load_config("smoke")

# The tiny backbone reads the task prompt as 453 byte tokens, five times the cost of the trajectory; the runner's
# logic does not depend on it, so these tests switch it off (the smoke-profile timings in the report keep it on).
OVERRIDES = ["model.use_prompt=false"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    return dict(results_dir=root / "results", runs_dir=root / "runs", cache_dir=root / "cache")


@pytest.fixture(scope="module")
def supervised_run(dirs):
    return run_experiment("supervised", "smoke", overrides=OVERRIDES, **dirs)


# ---------------------------------------------------------------------------------------------------------
# model configurations the experiments build

def test_dense_lora_needs_the_personalized_moe_off_and_backbone_init_is_checked():
    with pytest.raises(ConfigError, match="dense_lora"):
        ModelConfig(backbone="tiny", num_layers=4, pmoe_layers=(1, 3), dense_lora=True)
    with pytest.raises(ConfigError, match="backbone_init"):
        ModelConfig(backbone_init="scratch")


def test_random_backbone_keeps_shapes_and_tokenizer_and_redraws_weights():
    pretrained = load_backbone("tiny", 2, seed=0)
    fresh = randomly_initialised(pretrained, seed=7)
    reference = load_backbone("tiny", 2, seed=7)    # the tiny backbone is itself transformers' init under a seed
    assert fresh.tokenizer_encode("abc") == pretrained.tokenizer_encode("abc") and fresh.config == pretrained.config
    for (name, a), b, c in zip(fresh.model.named_parameters(), pretrained.model.parameters(),
                               reference.model.parameters()):
        assert a.shape == b.shape and torch.equal(a, c), name
    up = [b.model.model.layers[0].mlp.up_proj.weight for b in (fresh, pretrained)]
    assert not torch.equal(*up)


# ---------------------------------------------------------------------------------------------------------
# plans

def test_every_profile_is_one_valid_configuration_and_bad_plans_name_the_field():
    for profile in PROFILES:
        cfg = resolve_config(profile)
        assert cfg.plan.validate() is cfg.plan and cfg.profile == profile
    with pytest.raises(ConfigError, match="plan overrides"):
        resolve_config("smoke", plan={"nope": 1})
    with pytest.raises(ConfigError, match="plan.ablations"):
        resolve_config("smoke", overrides=["plan.ablations=[no_such_group]"])
    with pytest.raises(ConfigError, match="plan.ablation_train"):
        resolve_config("smoke", overrides=["plan.ablation_train={epoch: 3}"])
    with pytest.raises(ConfigError, match="experiment 'nope'"):
        run_experiment("nope", "smoke")


def test_the_train_section_is_the_budget_of_every_job_and_ablations_change_only_what_the_plan_says():
    plain = Runner("supervised", "smoke")
    cfg = run_config(plain.cfg, "nextlocmoe")
    assert (cfg.train.epochs, cfg.train.max_train_windows) == (SMOKE.train.epochs, SMOKE.train.max_train_windows)
    user = Runner("ablations", "smoke", overrides=["train.epochs=3", "plan.ablation_train={max_train_windows: 16}"])
    assert run_config(user.cfg, "nextlocmoe").train.epochs == 3
    ablated = user.job_config(user.cfg.data, user.cfg.model, user.plan.ablation_train).train
    assert (ablated.epochs, ablated.max_train_windows) == (3, 16)


# ---------------------------------------------------------------------------------------------------------
# supervised: files, tidy table, caching

def test_supervised_writes_three_files_with_provenance(supervised_run, dirs):
    paths = supervised_run.paths
    assert {k: p.name for k, p in paths.items()} == {"csv": "supervised.csv", "md": "supervised.md",
                                                     "json": "supervised.json"}
    stamp = json.loads(paths["json"].read_text())
    for key in ("git_sha", "device", "packages", "seed", "wall_s", "plan", "jobs", "created_utc"):
        assert key in stamp, key
    assert stamp["profile"] == "smoke" and stamp["data_checksum"]["synthetic"]
    assert len(stamp["jobs"]) == len(SUPERVISED_METHODS) == supervised_run.computed
    md = paths["md"].read_text()
    for method in SUPERVISED_METHODS:
        assert f"| {method} | {METHOD_KIND[method]} | synthetic |" in md
    assert "Hit@10" in md and "median dist (m)" in md


def test_supervised_table_is_tidy_and_every_method_sees_the_same_test_set(supervised_run):
    df = pd.read_csv(supervised_run.paths["csv"])
    assert list(df.columns) == [*ID_COLUMNS, "metric", "value"]
    assert not df.duplicated(["method", "dataset", "variant", "metric"]).any()
    assert set(df["experiment"]) == {"supervised"} and set(df["method"]) == set(SUPERVISED_METHODS)
    kinds = dict(df.drop_duplicates("method")[["method", "kind"]].values)
    assert kinds == {m: METHOD_KIND[m] for m in SUPERVISED_METHODS}
    assert METHOD_KIND["nextlocmoe"] == "paper method" and METHOD_KIND["nextlocmoe_ranking"] == "extension"
    wide = df.pivot_table(index="method", columns="metric", values="value")
    # the smoke city has 49 test windows; the plan's budget evaluates a seeded subsample of 32 for every method
    assert wide["n"].nunique() == 1 and wide["n"].iloc[0] == SMOKE.train.max_eval_windows == 32
    assert (wide["hit@1"] <= wide["hit@5"]).all() and (wide["hit@10"] <= wide["hit@20"]).all()


def test_every_row_is_paired_against_the_best_training_free_scorer_on_the_same_windows(supervised_run, dirs):
    """The paired metrics of the table are metrics.paired_comparison of the jobs' stored test ranks, against the
    tuned scorer with the highest validation MRR; the reference row is flagged, the others each carry a test."""
    from nextlocmoe.metrics import paired_comparison
    from nextlocmoe.window_scorers import SCORERS

    records = [json.loads(p.read_text()) for p in (dirs["runs_dir"] / "supervised").glob("*/result.json")]
    scorers = [r for r in records if r["method"] in SCORERS]
    reference = max(scorers, key=lambda r: r["details"]["val"]["mrr"])
    df = pd.read_csv(supervised_run.paths["csv"])
    flagged = df[df["metric"] == "paired_reference"]
    assert flagged[["method", "value"]].values.tolist() == [[reference["method"], 1.0]]
    other = next(r for r in records if r["method"] == "nextlocmoe_ranking")
    assert len(other["ranks"]) == len(reference["ranks"]) == 32
    expected = paired_comparison(other["ranks"], reference["ranks"], ks=(1, 10))
    row = df[(df["method"] == "nextlocmoe_ranking")].set_index("metric")["value"]
    for m in ("hit@1", "hit@10", "mrr"):
        for suffix in ("", "_lo", "_hi", "_p"):
            assert row[f"paired_{m}{suffix}"] == pytest.approx(expected[f"{m}_{'diff' if not suffix else suffix[1:]}"])
    paired_methods = set(df.loc[df["metric"] == "paired_hit@1", "method"])
    assert paired_methods == set(SUPERVISED_METHODS) - {reference["method"]}
    assert "Paired tests" in supervised_run.paths["md"].read_text()


def test_second_call_reads_the_cache_and_force_recomputes(supervised_run, dirs, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a cached experiment must not train")

    monkeypatch.setattr(experiments.core, "train", no_training)
    again = run_experiment("supervised", "smoke", overrides=OVERRIDES, **dirs)
    assert (again.computed, again.cached, again.trained) == (0, len(SUPERVISED_METHODS), 0)
    assert again.table.to_csv(index=False) == supervised_run.table.to_csv(index=False)
    monkeypatch.undo()
    forced = run_experiment("supervised", "smoke", overrides=OVERRIDES, force=True, **dirs)
    models = sum(get_method(m).family == "model" for m in SUPERVISED_METHODS)       # each trained once again
    assert (forced.computed, forced.cached, forced.trained) == (len(SUPERVISED_METHODS), 0, models)
    assert [j["hash"] for j in forced.jobs] == [j["hash"] for j in supervised_run.jobs]
    # training is seeded per (seed, epoch): recomputing reproduces the numbers
    a, b = (r.table.set_index(["method", "metric"])["value"] for r in (supervised_run, forced))
    assert np.allclose(a.loc[b.index], b, rtol=1e-4)


def test_a_changed_config_gets_a_new_job_and_never_reuses_the_stale_result(supervised_run, dirs):
    changed = run_experiment("supervised", "smoke", overrides=OVERRIDES + ["train.lr=0.01"],
                             methods=("nextlocmoe", "markov"), **dirs)
    old = {j["job"].rsplit("-", 1)[0]: j["hash"] for j in supervised_run.jobs}
    new = {j["job"].rsplit("-", 1)[0]: (j["hash"], j["cached"]) for j in changed.jobs}
    assert new["nextlocmoe-synthetic-default"][0] != old["nextlocmoe-synthetic-default"]
    assert new["nextlocmoe-synthetic-default"][1] is False and changed.trained == 1
    # the learning rate does not touch a counting baseline: same key, cache hit
    assert new["markov-synthetic-default"] == (old["markov-synthetic-default"], True)
    assert (dirs["runs_dir"] / "supervised" / f"nextlocmoe-synthetic-default-{old['nextlocmoe-synthetic-default']}"
            / "result.json").exists()


def test_nextlocmoe_train_resolves_to_the_supervised_jobs_configuration(supervised_run, dirs, capsys):
    for method in ("nextlocmoe", "nextlocmoe_ranking", "nextlocllm"):
        assert main(["train", "--profile", "smoke", "--method", method, "--dataset", "synthetic", "--dry-run",
                     "--set", OVERRIDES[0]]) == 0
        printed = capsys.readouterr().out
        cli_hash = printed.split("# config_hash: ")[1].split()[0]
        job, = [j for j in supervised_run.jobs if j["job"].startswith(f"{method}-synthetic-default-")]
        record = json.loads((dirs["runs_dir"] / job["dir"] / "result.json").read_text())
        assert record["details"]["config_hash"] == cli_hash, method
        cfg = run_config(resolve_config("smoke", overrides=OVERRIDES), method, "synthetic")
        assert config_hash(cfg) == cli_hash
    # another budget is another configuration: the hash sees the train section
    assert main(["train", "--profile", "smoke", "--dry-run", "--set", OVERRIDES[0], "--set", "train.epochs=2"]) == 0
    assert capsys.readouterr().out.split("# config_hash: ")[1].split()[0] != cli_hash


class LastPlace:
    """A toy baseline for the registry test: the current record's place scores 1, every other place 0."""
    name = "toy_last_place"

    def fit(self, windows):
        self.n_locations = windows.n_locations
        return self

    def score(self, batch):
        scores = np.zeros((len(batch["cur_location"]), self.n_locations))
        scores[np.arange(len(scores)), np.asarray(batch["cur_location"])[:, -1]] = 1.0
        return scores


def test_a_method_added_through_the_registry_runs_in_the_supervised_table(supervised_run, dirs):
    register_method(Method("toy_last_place", "baseline", "baseline", "predict the current place again",
                           make=lambda plan, seed: LastPlace()))
    try:
        result = run_experiment("supervised", "smoke", overrides=OVERRIDES, methods=("toy_last_place", "markov"),
                                **dirs)
        rows = result.table[result.table["method"] == "toy_last_place"]
        wide = rows.set_index("metric")["value"]
        assert set(rows["kind"]) == {"baseline"} and wide["n"] == 32
        assert "| toy_last_place | baseline | synthetic |" in result.paths["md"].read_text()
        from nextlocmoe.report.style import FALLBACK_COLORS, method_color
        assert method_color("toy_last_place") in FALLBACK_COLORS      # a method the report has no style for still draws
        with pytest.raises(ConfigError, match="registered already"):
            register_method(Method("toy_last_place", "baseline", "baseline", "again",
                                   make=lambda plan, seed: LastPlace()))
    finally:
        unregister_method("toy_last_place")
    with pytest.raises(ConfigError, match="method 'toy_last_place' is unknown"):
        get_method("toy_last_place")


# ---------------------------------------------------------------------------------------------------------
# zero-shot

@pytest.fixture(scope="module")
def humob_cities(tmp_path_factory):
    root = tmp_path_factory.mktemp("humob")
    cities = {}
    for name, layout in (("A", 3), ("B", 4)):
        path = write_humob_csv(generate_city(SyntheticConfig(grid=10, users=40, days=14, layout_seed=layout,
                                                             seed=layout)), root / f"city{name}.csv")
        cities[name] = DataConfig(source="humob", path=str(path), humob_grid=10)
    return cities


@pytest.fixture(scope="module")
def zero_shot_run(supervised_run, dirs, humob_cities):
    return run_experiment("zero_shot", "smoke", overrides=OVERRIDES, humob_paths=humob_cities, **dirs)


def test_zero_shot_covers_every_pair_with_references_and_llm_mob(zero_shot_run):
    df = zero_shot_run.table
    pairs = ["synthetic_A->synthetic_B", "synthetic_west->synthetic_east", "humob_A->humob_B"]
    assert list(dict.fromkeys(df["dataset"])) == pairs
    for pair in pairs:
        rows = df[df["dataset"] == pair]
        assert set(zip(rows["method"], rows["variant"])) == {
            ("nextlocmoe", "zero-shot"), ("nextlocmoe_ranking", "zero-shot"), ("nextlocllm", "zero-shot"),
            ("nextlocmoe", "trained on target"),
            ("user_most_frequent", "history only (no training)"), ("llm_mob", "zero-shot (prompted, no training)"),
            ("window_time_recency", "training-free (parameters from the source)")}
        n = rows[rows["metric"] == "n"]
        assert n[n["method"] != "llm_mob"]["value"].nunique() == 1           # one test subsample for all
        assert n[n["method"] == "llm_mob"]["value"].item() <= SMOKE.plan.llm_mob_samples
        assert (rows[rows["method"] == "llm_mob"]["metric"] == "unparsable").any()
    assert not df.duplicated(["method", "dataset", "variant", "metric"]).any()
    # the source models of synthetic A are the supervised ones: shared, not retrained (3 pairs x 3 sources +
    # 3 trained on target, less the 3 of synthetic A)
    assert zero_shot_run.trained == 9


def test_zero_shot_region_split_is_disjoint_brute_force_and_documented(zero_shot_run):
    cfg = load_config("smoke")
    data = load_records(cfg.data)
    split = home_regions(data)
    # brute force: most visited location per user, lowest id on ties; median of home x (grid data: no longitude)
    homes = {}
    for user, group in data.records.groupby("user"):
        counts = Counter(group["location"].tolist())
        homes[user] = min(counts, key=lambda loc: (-counts[loc], loc))
    x = {u: data.locations["x"].iloc[h] for u, h in homes.items()}
    median = float(np.median(list(x.values())))
    assert split.coordinate == "x" and split.median == median
    assert set(split.west_users) == {u for u, v in x.items() if v < median}
    assert set(split.east_users) == {u for u, v in x.items() if v >= median}
    assert not set(split.west_users) & set(split.east_users) and len(split.west_users) + len(split.east_users) == len(x)
    stamp = json.loads(zero_shot_run.paths["json"].read_text())
    documented = stamp["decisions"]["regions"]["synthetic_west->synthetic_east"]
    assert documented["source_users"] == len(split.west_users) and documented["target_users"] == len(split.east_users)
    assert "west of the median" in documented["rule"]
    assert "SOURCE statistics" in zero_shot_run.paths["md"].read_text()


def test_zero_shot_uses_target_candidates_and_source_statistics(zero_shot_run, dirs):
    records = [json.loads(p.read_text()) for p in (dirs["runs_dir"] / "zero_shot").glob("*/result.json")]
    record, = [r for r in records if (r["method"], r["dataset"], r["variant"]) ==
               ("nextlocmoe", "synthetic_A->synthetic_B", "zero-shot")]
    runner = Runner("zero_shot", "smoke", overrides=OVERRIDES, **dirs)
    cfg = runner.cfg
    job_cfg = runner.job_config(cfg.data, get_method("nextlocmoe").model_config(cfg.model))
    source = runner.handle("a", cfg.data).windows
    target = runner.handle("b", experiments.second_city(cfg.data)).windows
    assert target.n_locations != source.n_locations       # 14 x 14 vs 12 x 12 cells
    again = experiments.transfer_ranks(job_cfg, dirs["runs_dir"] / record["details"]["model_dir"], source, target)
    assert again.metrics() == pytest.approx(record["metrics"])
    assert again.rank.tolist() == record["ranks"]
    ranking, = [r for r in records if (r["method"], r["dataset"], r["variant"]) ==
                ("nextlocmoe_ranking", "synthetic_A->synthetic_B", "zero-shot")]   # the ranking head transfers too
    ranking_cfg = runner.job_config(cfg.data, get_method("nextlocmoe_ranking").model_config(cfg.model))
    again = experiments.transfer_ranks(ranking_cfg, dirs["runs_dir"] / ranking["details"]["model_dir"], source, target)
    assert again.rank.tolist() == ranking["ranks"] and max(again.rank) <= target.n_locations


# ---------------------------------------------------------------------------------------------------------
# ablations

ABLATION_PLAN = {"ablations": ("no_location_moe", "experts", "depth"), "expert_counts": (1,), "depths": (2,)}


def test_ablations_choose_the_head_by_validation_and_vary_one_thing(supervised_run, dirs):
    result = run_experiment("ablations", "smoke", overrides=OVERRIDES, plan=ABLATION_PLAN, **dirs)
    stamp = json.loads(result.paths["json"].read_text())
    choice = stamp["decisions"]["ablation_head"]
    val = {}
    for job in supervised_run.jobs:
        record = json.loads((dirs["runs_dir"] / job["dir"] / "result.json").read_text())
        if record["method"] in ("nextlocmoe", "nextlocmoe_ranking"):
            val["regression" if record["method"] == "nextlocmoe" else "ranking"] = record["details"]["val"]["hit@10"]
    assert choice["val_hit@10"] == pytest.approx(val)
    assert choice["head"] == ("ranking" if val["ranking"] > val["regression"] else "regression")
    variants = list(dict.fromkeys(result.table["variant"]))
    assert variants == ["full", "no_location_moe", "experts_1", "depth_2", "training-free floor"]
    assert len({j["hash"] for j in result.jobs}) == 5 and result.trained == 3   # "full" is the supervised model
    kinds = result.table.drop_duplicates("variant").set_index("variant")["kind"]
    assert kinds["no_location_moe"] == "ablation" and kinds["full"] in ("paper method", "extension")
    # the floor on the same test windows, and every other row paired against the full model
    methods = result.table.drop_duplicates("variant").set_index("variant")["method"]
    assert methods["training-free floor"] == "window_time" and kinds["training-free floor"] == "baseline"
    assert stamp["decisions"]["paired_reference"] == {"synthetic": {"method": methods["full"], "variant": "full"}}
    paired = set(result.table.loc[result.table["metric"] == "paired_hit@10_p", "variant"])
    assert paired == {"no_location_moe", "experts_1", "depth_2", "training-free floor"}


def test_depth_ablation_keeps_the_pmoe_layers_at_the_top_of_the_stack():
    paper = ModelConfig(backbone="tiny", num_layers=12, pmoe_layers=(8, 10))
    plan = dataclasses.replace(load_config("cpu").plan, ablations=("depth", "experts"), expert_counts=(1,),
                               depths=(4, 8, 12))
    variants = ablation_variants(paper, plan)
    assert variants["depth_4"][1].pmoe_layers == (0, 2) and variants["depth_8"][1].pmoe_layers == (4, 6)
    assert "depth_12" not in variants
    one = variants["experts_1"][1].personalized
    assert one.num_experts == 1 and one.top_k == 1


# ---------------------------------------------------------------------------------------------------------
# efficiency

def test_efficiency_measures_speed_memory_and_the_llm_mob_ratio(dirs):
    plan = {"batch_sweep": (1, 4), "generation_batches": (1, 2), "repeats": 1}
    result = run_experiment("efficiency", "smoke", overrides=OVERRIDES, plan=plan, **dirs)
    wide = result.table.pivot_table(index="method", columns="metric", values="value")
    for method in ("nextlocmoe", "nextlocllm", "nextlocmoe_ranking"):
        row = wide.loc[method]
        assert row["best_batch"] in (1, 4) and row["params_trainable"] < row["params_total"]
        assert row["infer_samples_per_s_best"] == max(row["infer_samples_per_s_b1"], row["infer_samples_per_s_b4"])
        assert row["train_samples_per_s"] > 0 and row["peak_memory_infer_mib"] > 0
    ours, gen = wide.loc["nextlocmoe"], wide.loc["llm_mob"]
    ratio = wide.loc["nextlocmoe_vs_llm_mob"]
    assert ratio["speedup_vs_generation_b1"] == pytest.approx(
        ours["infer_samples_per_s_best"] / gen["gen_samples_per_s_b1"])
    assert ratio["speedup_best_vs_best"] == pytest.approx(
        ours["infer_samples_per_s_best"] / max(gen["gen_samples_per_s_b1"], gen["gen_samples_per_s_b2"]))
    stamp = json.loads(result.paths["json"].read_text())
    assert "cpu" in stamp["decisions"]["memory"]
    assert "| metric | nextlocllm |" in result.paths["md"].read_text()


def test_backbone_overhead_compares_with_the_bare_backbone_on_identical_shapes(dirs):
    runner = Runner("efficiency", "smoke", overrides=OVERRIDES, **dirs)
    windows = runner.dataset("synthetic").windows
    metrics = backbone_overhead(runner.cfg.model, windows, (2,), repeats=1)
    assert metrics["tokens_per_sample"] == 45
    assert metrics["e2e_over_bare_b2"] == pytest.approx(metrics["e2e_samples_per_s_b2"] /
                                                        metrics["bare_backbone_samples_per_s_b2"])


# ---------------------------------------------------------------------------------------------------------
# CLI

def test_cli_run_reads_the_cache_and_reports_errors_in_one_line(supervised_run, dirs, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)   # the CLI's window cache is relative to the working directory
    args = ["run", "supervised", "--profile", "smoke", "--results", str(tmp_path / "results"),
            "--runs", str(dirs["runs_dir"]), "--set", OVERRIDES[0]]
    assert main(args) == 0
    assert "| nextlocmoe | paper method | synthetic |" in capsys.readouterr().out
    stamp = json.loads((tmp_path / "results" / "supervised.json").read_text())
    assert stamp["jobs_computed"] == 0 and stamp["jobs_cached"] == len(SUPERVISED_METHODS)
    assert main(["run", "zero_shot", "--profile", "smoke", "--humob", "no-equals-sign"]) == 2
    err = capsys.readouterr().err
    assert "CITY=PATH" in err and "Traceback" not in err


def test_summarize_states_the_best_method_and_nextlocmoe_rank_from_the_table():
    from nextlocmoe.report.summaries import summarize

    rows = []
    for method, kind, h1, h10 in [("markov", "baseline", 0.10, 0.30), ("user_most_frequent", "baseline", 0.20, 0.50),
                                  ("nextlocmoe", "paper method", 0.15, 0.60)]:
        rows += [{"experiment": "supervised", "method": method, "kind": kind, "dataset": "nyc", "variant": "default",
                  "metric": m, "value": v} for m, v in (("hit@1", h1), ("hit@10", h10))]
    text = summarize(pd.DataFrame(rows), "supervised")
    assert "**nyc**, Hit@1: best user_most_frequent (0.200); nextlocmoe 0.150 (rank 2 of 3, -0.050 vs the best " \
           "baseline user_most_frequent)" in text
    assert "Hit@10: best nextlocmoe (0.600); nextlocmoe 0.600 (rank 1 of 3, +0.100 vs the best baseline " \
           "user_most_frequent)" in text
    ablation = pd.DataFrame([{"experiment": "ablations", "method": "nextlocmoe", "kind": k, "dataset": "nyc",
                              "variant": v, "metric": "hit@10", "value": x}
                             for v, k, x in (("full", "paper method", 0.5), ("no_prompt", "ablation", 0.4),
                                             ("experts_1", "ablation", 0.55))])
    assert "full model 0.500; change per variant (lowest first): no_prompt -0.100, experts_1 +0.050." in \
        summarize(ablation, "ablations")


def test_a_model_with_overrides_never_takes_the_tables_shipped_folder():
    """The shipped folder of a supervised model is <method>-<dataset>-<variant>; one trained with overrides under
    the name 'default' gets its configuration hash instead of the supervised table's folder."""
    from nextlocmoe.config import config_hash, load_config
    from nextlocmoe.experiments.supervised import model_folder
    cfg = load_config("smoke")
    assert model_folder("nextlocmoe", "synthetic", "default", cfg, False) == "nextlocmoe-synthetic-default"
    assert model_folder("nextlocmoe", "synthetic", "no_balance", cfg, True) == "nextlocmoe-synthetic-no_balance"
    assert model_folder("nextlocmoe", "synthetic", "default", cfg, True) == \
        f"nextlocmoe-synthetic-custom_{config_hash(cfg)}"
