"""The synthetic city: determinism, sizes, layout structure, role schedules that hold statistically,
and the HuMob round trip (write the CSV, read it with the humob loader, get the synthetic loader's data)."""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest

from nextlocmoe.data.config import DataConfig, SyntheticConfig
from nextlocmoe.data.schema import FUNCTIONS, ROLES
from nextlocmoe.data.sources import load_records
from nextlocmoe.data.synthetic import (FUNCTION_SHARES, ROLE_SCHEDULES, draw_layout, generate_city,
                                       write_humob_csv)
from nextlocmoe.errors import ConfigError
from nextlocmoe.io import stable_hash

CFG = SyntheticConfig(grid=30, users=330, days=28, explore=0.1, layout_seed=3, seed=5)


@pytest.fixture(scope="module")
def city():
    return generate_city(CFG)


@pytest.fixture(scope="module")
def visits(city):
    """Records joined with the truth: role of the user, function of the cell, weekday and hour."""
    rec = city.records_humob
    cell = (rec["y"] - 1) * CFG.grid + (rec["x"] - 1)
    return rec.assign(role=city.user_role.to_numpy()[rec["uid"]], function=city.cell_function[cell],
                      weekday=rec["d"] % 7 < 5, hour=rec["t"] / 2, cell=cell)


# ---------------------------------------------------------------------------------------------------
# Determinism and sizes
# ---------------------------------------------------------------------------------------------------

def test_same_seed_same_city_other_seed_other_city(city):
    again = generate_city(CFG)
    pd.testing.assert_frame_equal(city.records_humob, again.records_humob)
    assert (city.cell_function == again.cell_function).all()
    assert city.user_role.equals(again.user_role)
    other_people = generate_city(replace(CFG, seed=6))
    assert (other_people.cell_function == city.cell_function).all()          # layout kept
    assert not other_people.records_humob.equals(city.records_humob)
    other_layout = generate_city(replace(CFG, layout_seed=4))
    assert (other_layout.cell_function != city.cell_function).mean() > 0.2


def test_sizes_and_humob_convention(city):
    rec = city.records_humob
    assert list(rec.columns) == ["uid", "d", "t", "x", "y"] and (rec.dtypes == np.int64).all()
    assert city.cell_function.shape == (CFG.grid ** 2,)
    assert rec["uid"].between(0, CFG.users - 1).all() and rec["uid"].nunique() == CFG.users
    assert rec["d"].between(0, CFG.days - 1).all() and rec["t"].between(0, 47).all()
    assert rec["x"].between(1, CFG.grid).all() and rec["y"].between(1, CFG.grid).all()
    key = rec["uid"].to_numpy() * 10_000 + rec["d"].to_numpy() * 48 + rec["t"].to_numpy()
    assert (np.diff(key) > 0).all()                           # sorted by (uid, d, t), one record per slot
    per_user_day = rec.groupby(["uid", "d"]).size()
    assert len(per_user_day) == CFG.users * CFG.days          # at least the wake-up record every day
    assert 2 <= per_user_day.mean() <= 12                     # several a day, not 48


def test_layout_quotas_and_spatial_structure():
    grid = 40
    function = draw_layout(grid, layout_seed=11)
    counts = np.bincount(function, minlength=len(FUNCTIONS))
    for name, share in FUNCTION_SHARES.items():
        assert counts[FUNCTIONS.index(name)] == round(share * grid * grid)
    assert counts[FUNCTIONS.index("Residential")] == grid * grid - sum(round(s * grid * grid)
                                                                      for s in FUNCTION_SHARES.values())

    def same_neighbour_share(f: np.ndarray) -> float:
        m = f.reshape(grid, grid)
        return float(np.concatenate([(m[1:] == m[:-1]).ravel(), (m[:, 1:] == m[:, :-1]).ravel()]).mean())

    shuffled = np.mean([same_neighbour_share(np.random.default_rng(i).permutation(function)) for i in range(5)])
    assert same_neighbour_share(function) > shuffled + 0.1    # clustered, not i.i.d.
    # commerce concentrates towards the core; homes do not
    row, col = np.divmod(np.arange(grid * grid), grid)
    dist = np.hypot(row - grid / 2, col - grid / 2)
    assert dist[function == FUNCTIONS.index("Commercial")].mean() < 0.8 * dist[function == FUNCTIONS.index(
        "Residential")].mean()


def test_every_role_present_with_its_anchors(city):
    counts = city.user_role.value_counts()
    assert set(counts.index) == set(ROLES) and counts.min() >= CFG.users // len(ROLES)
    assert (city.cell_function[city.user_home] == "Residential").all()
    work_function = pd.Series(city.cell_function[city.user_work], index=city.user_role.index)
    for role, allowed in [("Student", {"Education"}), ("Teacher", {"Education"}),
                          ("Public Service Official", {"Public"}), ("Retail Employee", {"Commercial"}),
                          ("Office Worker", {"Commercial", "Public"})]:
        assert set(work_function[city.user_role == role]) <= allowed
    remote = (city.user_role == "Remote Worker").to_numpy()
    assert (city.user_work[remote] == city.user_home[remote]).all()


def test_config_checks():
    for bad in (dict(grid=2), dict(explore=1.5), dict(users=0), dict(days=0), dict(cell_m=0.0)):
        with pytest.raises(ConfigError, match="data.synthetic"):
            generate_city(replace(CFG, **bad))
    assert tuple(ROLE_SCHEDULES) == ROLES


# ---------------------------------------------------------------------------------------------------
# Schedules hold statistically
# ---------------------------------------------------------------------------------------------------

def test_students_are_at_school_on_weekday_daytime(visits):
    daytime = visits[visits["weekday"] & visits["hour"].between(9, 15, inclusive="left")]
    education = daytime.groupby("role")["function"].apply(lambda f: (f == "Education").mean())
    assert education["Student"] > 0.6
    assert education["Night Shift Worker"] < 0.1 and education["Office Worker"] < 0.1


def test_night_shift_workers_are_out_at_night(visits):
    night = (visits["hour"] >= 22) | (visits["hour"] < 6)
    share = night.groupby(visits["role"]).mean()
    assert share["Night Shift Worker"] > 2 * share["Office Worker"]
    assert share["Night Shift Worker"] > 0.2
    # and the night-time records of night shift workers are mostly away from home
    ns = visits[night & (visits["role"] == "Night Shift Worker")]
    assert (ns["function"] != "Residential").mean() > 0.5


def test_role_signatures(visits):
    by_role = visits.groupby("role")
    # fitness enthusiasts: entertainment at dawn and in the evening
    active = visits[visits["hour"].between(5.5, 8) | visits["hour"].between(18, 21)]
    ent = active.groupby("role")["function"].apply(lambda f: (f == "Entertainment").mean())
    assert ent["Fitness Enthusiast"] > 2 * ent.drop("Fitness Enthusiast").median()
    # visitors roam: many more distinct cells per user than office workers; remote workers stay home most
    distinct = visits.groupby(["role", "uid"])["cell"].nunique().groupby("role").mean()
    assert distinct["Visitor"] > 3 * distinct["Office Worker"]
    home_share = by_role["function"].apply(lambda f: (f == "Residential").mean())
    assert home_share["Remote Worker"] > home_share["Office Worker"]
    # public service officials work in public cells during office hours on weekdays
    office = visits[visits["weekday"] & visits["hour"].between(9, 16, inclusive="left")]
    public = office.groupby("role")["function"].apply(lambda f: (f == "Public").mean())
    assert public["Public Service Official"] > 0.5 > public["Student"]
    # retail employees work weekends too; office workers mostly do not
    weekend_day = visits[~visits["weekday"] & visits["hour"].between(10, 17, inclusive="left")]
    commercial = weekend_day.groupby("role")["function"].apply(lambda f: (f == "Commercial").mean())
    assert commercial["Retail Employee"] > commercial["Public Service Official"]


def test_explore_controls_the_share_of_unusual_places():
    def unusual_share(explore: float) -> float:
        c = generate_city(replace(CFG, explore=explore, users=110))
        rec = c.records_humob
        cell = ((rec["y"] - 1) * CFG.grid + (rec["x"] - 1)).to_numpy()
        students = (c.user_role == "Student").to_numpy()[rec["uid"]]
        at_school = c.cell_function[cell] == "Education"
        mine = cell == c.user_work[rec["uid"]]
        sel = students & at_school
        return float((~mine[sel]).mean())

    assert unusual_share(0.0) == 0.0          # without exploration a student only ever goes to their school
    assert unusual_share(0.5) > 0.2           # with it, other campuses of the same function appear


# ---------------------------------------------------------------------------------------------------
# The synthetic loader and the HuMob round trip
# ---------------------------------------------------------------------------------------------------

def test_synthetic_loader_truth_and_checksum():
    cfg = DataConfig(source="synthetic", synthetic=replace(CFG, users=60, days=7))
    data = load_records(cfg)
    city = generate_city(cfg.synthetic)
    assert data.checksum == stable_hash(asdict(cfg.synthetic))
    assert data.checksum != load_records(replace(cfg, synthetic=replace(cfg.synthetic, seed=9))).checksum
    assert len(data.records) == len(city.records_humob)
    assert (data.records["function"].to_numpy() == city.cell_function[data.records["location"]]).all()
    assert (data.locations["function"].to_numpy() == city.cell_function).all()
    role = data.truth["user_role"]
    assert list(role.index) == list(range(60)) and role.equals(city.user_role.reset_index(drop=True))
    assert (data.truth["cell_function"] == city.cell_function).all()


def test_humob_round_trip(tmp_path):
    syn = replace(CFG, users=80, days=10, grid=25, cell_m=250.0)
    city = generate_city(syn)
    path = write_humob_csv(city, tmp_path / "city.csv")
    assert pd.read_csv(path).equals(city.records_humob)
    via_file = load_records(DataConfig(source="humob", path=str(path), humob_grid=syn.grid, humob_cell_m=syn.cell_m))
    direct = load_records(DataConfig(source="synthetic", synthetic=syn))
    columns = ["user", "timestamp", "x", "y", "location"]
    pd.testing.assert_frame_equal(via_file.records[columns], direct.records[columns])
    pd.testing.assert_frame_equal(via_file.locations[["x", "y", "name"]], direct.locations[["x", "y", "name"]])
    assert (via_file.records["function"] == "Unknown").all()


@pytest.mark.slow
def test_paper_sized_city_generates_in_seconds():
    start = time.perf_counter()
    city = generate_city(SyntheticConfig(grid=200, users=6000, days=75))
    assert time.perf_counter() - start < 30
    assert city.records_humob["uid"].nunique() == 6000
