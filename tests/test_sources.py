"""Data sources: each loader against an independent reading of a small file the test writes itself,
plus the real New York sample of mat-data, plus one clear DataError per kind of bad input."""

from __future__ import annotations

import collections
import datetime as dt
import math

import numpy as np
import pandas as pd
import pytest

from nextlocmoe.data import sources
from nextlocmoe.data.config import CsvColumns, DataConfig
from nextlocmoe.data.schema import FUNCTIONS, UNKNOWN_FUNCTION
from nextlocmoe.data.windows import make_windows
from nextlocmoe.data.sources import (ROOT_TYPE_TO_FUNCTION, category_to_function, categories_to_functions,
                                     describe, load_records, project_to_plane)
from nextlocmoe.errors import ConfigError, DataError
from nextlocmoe.io import file_sha256


def haversine_m(lat1, lon1, lat2, lon2, radius=sources.EARTH_RADIUS_M):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * radius * math.asin(math.sqrt(a))


def assert_sorted_by_user_time(records: pd.DataFrame) -> None:
    key = list(zip(records["user"], records["timestamp"]))
    assert key == sorted(key)


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

def test_unknown_source_lists_known_ones():
    with pytest.raises(ConfigError) as e:
        load_records(DataConfig(source="geolife"))
    for name in sources.LOADERS:
        assert name in str(e.value)


def test_registry_covers_every_configured_source():
    from nextlocmoe.data.config import SOURCES
    assert set(sources.LOADERS) == set(SOURCES)


def test_file_sources_require_a_path():
    with pytest.raises(ConfigError, match="data.path"):
        load_records(DataConfig(source="humob"))


def test_missing_file(tmp_path):
    for source in ("humob", "foursquare_tsmc", "csv", "nyc_foursquare"):
        with pytest.raises(DataError, match="does not exist"):
            load_records(DataConfig(source=source, path=str(tmp_path / "nope.csv")))


# ---------------------------------------------------------------------------------------------------
# Function labels
# ---------------------------------------------------------------------------------------------------

def test_root_type_table_targets_the_five_functions():
    assert set(ROOT_TYPE_TO_FUNCTION.values()) == set(FUNCTIONS)


@pytest.mark.parametrize("name, function", [
    ("Coffee Shop", "Commercial"), ("Music Store", "Commercial"), ("Medical School", "Education"),
    ("Parking", "Public"), ("Art Museum", "Entertainment"), ("Home (private)", "Residential"),
    ("Fire Station", "Public"), ("Barbershop", "Commercial"), ("Tennis Court", "Entertainment"),
    ("Courthouse", "Public"), ("University", "Education"), ("Residential Building (Apartment / Condo)",
                                                             "Residential"),
    ("education", "Education"), ("Nightlife Spot", "Entertainment"), ("Xylophone Repair", UNKNOWN_FUNCTION),
    ("", UNKNOWN_FUNCTION),
])
def test_category_keywords(name, function):
    assert category_to_function(name) == function


def test_categories_vectorised_equals_one_by_one():
    names = pd.Series(["Bar", None, "Office", "Bar", "Zzz", "Park"])
    expected = [category_to_function(n) for n in names]
    assert categories_to_functions(names).tolist() == expected


# ---------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------

def test_projection_matches_great_circle_distances():
    rng = np.random.default_rng(0)
    lat = 40.7 + rng.uniform(-0.2, 0.2, 50)
    lon = -74.0 + rng.uniform(-0.2, 0.2, 50)
    x, y = project_to_plane(lat, lon)
    assert abs(x.mean()) < 200 and abs(y.mean()) < 1e-6  # centred (x exactly up to cos(lat) variation)
    for i, j in rng.integers(0, 50, size=(40, 2)):
        if i == j:
            continue
        plane = math.hypot(x[i] - x[j], y[i] - y[j])
        sphere = haversine_m(lat[i], lon[i], lat[j], lon[j])
        assert plane == pytest.approx(sphere, rel=5e-3)


# ---------------------------------------------------------------------------------------------------
# nyc_foursquare: the real sample shipped in mat-data
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nyc():
    return load_records(DataConfig(source="nyc_foursquare"))


@pytest.fixture(scope="module")
def nyc_raw():
    return pd.read_csv(sources.nyc_sample_path())


def test_nyc_sizes_and_contract(nyc, nyc_raw):
    assert len(nyc.records) == len(nyc_raw) == 66_962
    assert len(nyc.locations) == nyc_raw["lat_lon"].nunique() == 15_213
    assert 185 <= nyc.n_users <= 200  # heuristic user rebuild; the published source has 193 users
    assert nyc.checksum == file_sha256(sources.nyc_sample_path())
    assert_sorted_by_user_time(nyc.records)
    assert nyc.records["timestamp"].dtype == "datetime64[ns]"
    assert "category" in nyc.locations.columns


def test_nyc_users_equal_a_naive_walk_over_trajectories(nyc, nyc_raw):
    """Plain-Python restatement of the rule: a trajectory starting before the previous ended opens a user."""
    ts = pd.to_datetime(nyc_raw["date_time"])
    spans = collections.OrderedDict()
    for tid, t in zip(nyc_raw["tid"], ts):
        lo, hi = spans.get(tid, (t, t))
        spans[tid] = (min(lo, t), max(hi, t))
    user_of_tid, user, prev_end = {}, 0, None
    for tid, (lo, hi) in spans.items():
        if prev_end is not None and lo < prev_end:
            user += 1
        user_of_tid[tid] = user
        prev_end = hi
    expected = collections.Counter(user_of_tid[t] for t in nyc_raw["tid"])
    got = nyc.records.groupby("user").size()
    assert nyc.n_users == user + 1
    assert sorted(got.tolist()) == sorted(expected.values())


def test_nyc_locations_and_functions(nyc, nyc_raw):
    loc, rec = nyc.locations, nyc.records
    # every venue's function follows the table from its (majority) root type
    assert (loc["function"] == loc["category"].map(ROOT_TYPE_TO_FUNCTION)).all()
    majority = nyc_raw.groupby("lat_lon")["root_type"].agg(lambda s: sorted(s.value_counts().items(),
                                                                             key=lambda kv: (-kv[1], kv[0]))[0][0])
    assert dict(zip(loc["name"], loc["category"])) == majority.to_dict()
    # records carry their venue's coordinates, and those equal the venue text
    row = rec.iloc[123]
    venue = loc.iloc[row["location"]]
    lat, lon = (float(v) for v in venue["name"].split())
    assert (row["lat"], row["lon"], row["x"], row["y"]) == (lat, lon, venue["x"], venue["y"])
    assert abs(loc["lat"].mean() - 40.75) < 0.2 and abs(loc["x"].mean()) < 1.0


def test_keyword_rules_agree_with_the_root_types(nyc_raw):
    """Leaf categories (`type`) through the keyword rules vs. their root type through the table."""
    by_keywords = categories_to_functions(nyc_raw["type"])
    by_root = nyc_raw["root_type"].map(ROOT_TYPE_TO_FUNCTION).to_numpy()
    assert (by_keywords == by_root).mean() > 0.9
    assert (by_keywords == UNKNOWN_FUNCTION).mean() < 0.02


def write_nyc_like(path, rows):
    header = "tid,lat_lon,date_time,time,rating,price,weather,day,root_type,type\n"
    path.write_text(header + "".join(f"{t},{ll},{d},0,-1,-1,Clear,Monday,{r},x\n" for t, ll, d, r in rows))
    return path


def test_nyc_format_from_a_path(tmp_path):
    rows = [(1, "40.70 -74.00", "2012-04-02 08:00:00", "Food"),
            (1, "40.71 -74.01", "2012-04-03 09:00:00", "Residence"),
            (2, "40.70 -74.00", "2012-04-09 10:00:00", "Food"),          # starts after 1 ended: same user
            (3, "40.72 -74.02", "2012-04-01 10:00:00", "College & University")]  # goes back: new user
    data = load_records(DataConfig(source="nyc_foursquare", path=str(write_nyc_like(tmp_path / "f.csv", rows))))
    assert data.n_users == 2
    assert data.records.groupby("user").size().tolist() == [3, 1]
    assert sorted(data.locations["function"]) == ["Commercial", "Education", "Residential"]


def test_nyc_bad_rows(tmp_path):
    good = (1, "40.70 -74.00", "2012-04-02 08:00:00", "Food")
    bad_date = write_nyc_like(tmp_path / "a.csv", [good, (1, "40.70 -74.00", "yesterday", "Food")])
    with pytest.raises(DataError, match=r"date_time.*'yesterday'"):
        load_records(DataConfig(source="nyc_foursquare", path=str(bad_date)))
    bad_lat = write_nyc_like(tmp_path / "b.csv", [good, (1, "95.0 -74.00", "2012-04-02 09:00:00", "Food")])
    with pytest.raises(DataError, match=r"lat_lon.*95\.0"):
        load_records(DataConfig(source="nyc_foursquare", path=str(bad_lat)))
    (tmp_path / "c.csv").write_text("tid,latlon,date_time,root_type\n1,40 -74,2012-04-02 08:00:00,Food\n")
    with pytest.raises(DataError, match=r"missing column.*lat_lon.*found.*latlon"):
        load_records(DataConfig(source="nyc_foursquare", path=str(tmp_path / "c.csv")))


def test_nyc_without_mat_data(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="make install"):
        load_records(DataConfig(source="nyc_foursquare"))


# ---------------------------------------------------------------------------------------------------
# humob
# ---------------------------------------------------------------------------------------------------

def write_humob(path, rows, header="uid,d,t,x,y"):
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


HUMOB_ROWS = [  # uid, d, t, x, y; deliberately out of order, with masked rows
    (7, 0, 3, 1, 1), (7, 0, 1, 10, 10), (3, 2, 47, 5, 6), (3, 0, 0, 10, 1),
    (7, 60, 5, 999, 999), (3, 61, 0, 999, 999), (7, 1, 20, 4, 9),
]


def test_humob_conversion_by_hand(tmp_path):
    grid, cell_m = 10, 500.0
    path = write_humob(tmp_path / "h.csv", HUMOB_ROWS)
    data = load_records(DataConfig(source="humob", path=str(path), humob_grid=grid, humob_cell_m=cell_m))
    assert len(data.locations) == grid * grid and len(data.records) == 5
    assert data.checksum == file_sha256(path)
    day0 = dt.datetime(2023, 1, 2)
    kept = sorted([r for r in HUMOB_ROWS if r[3] != 999], key=lambda r: (r[0], r[1], r[2]))
    users = {3: 0, 7: 1}
    for (uid, d, t, x, y), (_, rec) in zip(kept, data.records.iterrows()):
        assert rec["user"] == users[uid]
        assert rec["timestamp"] == pd.Timestamp(day0 + dt.timedelta(days=d, minutes=30 * t))
        assert rec["location"] == (y - 1) * grid + (x - 1)
        assert rec["x"] == (x - 0.5 - grid / 2) * cell_m and rec["y"] == (y - 0.5 - grid / 2) * cell_m
        assert rec["function"] == UNKNOWN_FUNCTION and math.isnan(rec["lat"])
        assert data.locations["name"].iloc[int(rec["location"])] == f"{x},{y}"
    # the grid is centred at 0 and spans grid * cell_m
    assert data.locations["x"].min() == -data.locations["x"].max() == -(grid - 1) / 2 * cell_m
    assert data.truth["uid"].tolist() == [3, 7]


def test_humob_cells_outside_the_grid(tmp_path):
    path = write_humob(tmp_path / "h.csv", HUMOB_ROWS + [(1, 0, 0, 0, 5), (1, 0, 1, 11, 5)])
    with pytest.raises(DataError) as e:
        load_records(DataConfig(source="humob", path=str(path), humob_grid=10))
    message = str(e.value)
    assert "h.csv" in message and "2 row(s)" in message and "1..10" in message and "x=0" in message


def test_humob_bad_slot_and_values(tmp_path):
    with pytest.raises(DataError, match=r"slot t outside 0\.\.47"):
        load_records(DataConfig(source="humob", humob_grid=10,
                                path=str(write_humob(tmp_path / "a.csv", [(1, 0, 48, 1, 1)]))))
    with pytest.raises(DataError, match=r"column 'x'.*non-integer.*'abc'"):
        load_records(DataConfig(source="humob", humob_grid=10,
                                path=str(write_humob(tmp_path / "b.csv", [(1, 0, 1, 1, 1), (1, 0, 2, "abc", 1)]))))
    with pytest.raises(DataError, match=r"column 'd'.*missing"):
        load_records(DataConfig(source="humob", humob_grid=10,
                                path=str(write_humob(tmp_path / "c.csv", [(1, "", 1, 1, 1)]))))


def test_humob_all_masked(tmp_path):
    path = write_humob(tmp_path / "h.csv", [(1, 60, 0, 999, 999), (2, 61, 3, 999, 999)])
    with pytest.raises(DataError, match="no records left.*masked"):
        load_records(DataConfig(source="humob", path=str(path)))


def test_humob_misnamed_columns(tmp_path):
    path = write_humob(tmp_path / "h.csv", [(1, 0, 0, 1, 1)], header="user,day,t,x,y")
    with pytest.raises(DataError) as e:
        load_records(DataConfig(source="humob", path=str(path)))
    assert "['uid', 'd']" in str(e.value) and "'user'" in str(e.value) and "'day'" in str(e.value)


def test_humob_parser_error_is_wrapped(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("uid,d,t,x,y\n1,0,0,1,1\n1,0,1,1,1,9,9,9\n")
    with pytest.raises(DataError, match="could not be read as a HuMob CSV"):
        load_records(DataConfig(source="humob", path=str(path)))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_records(DataConfig(source="humob", path=str(tmp_path / "empty.csv")))


def test_humob_bad_start_date(tmp_path):
    path = write_humob(tmp_path / "h.csv", [(1, 0, 0, 1, 1)])
    with pytest.raises(ConfigError, match="humob_start"):
        load_records(DataConfig(source="humob", path=str(path), humob_start="not a date"))


# ---------------------------------------------------------------------------------------------------
# foursquare_tsmc
# ---------------------------------------------------------------------------------------------------

TSMC_ROWS = [  # user, venue, category id, category, lat, lon, offset (min), UTC time
    ("470", "49bbd6c0f964a520f4531fe3", "4bf58dd8d48988d127951735", "Arts & Crafts Store", "40.719810",
     "-74.002581", "-240", "Tue Apr 03 18:00:09 +0000 2012"),
    ("979", "4a43c0aef964a520c6a61fe3", "4bf58dd8d48988d1df941735", "Bridge", "40.606800", "-74.044170",
     "-240", "Tue Apr 03 18:00:25 +0000 2012"),
    ("470", "4c5cc7b485a1e21e00d35711", "4bf58dd8d48988d103941735", "Home (private)", "40.716162",
     "-73.883070", "-240", "Tue Apr 03 03:30:00 +0000 2012"),
    ("979", "49bbd6c0f964a520f4531fe3", "4bf58dd8d48988d127951735", "Arts & Crafts Store", "40.719812",
     "-74.002583", "-300", "Wed Apr 04 01:00:00 +0000 2012"),
    ("979", "4d0cc47f903d37041864bf55", "4bf58dd8d48988d1e0931735", "Café", "40.7", "-74.0",
     "540", "Wed Apr 04 20:00:00 +0000 2012"),
]


def write_tsmc(path, rows):
    path.write_bytes("".join("\t".join(r) + "\r\n" for r in rows).encode("latin-1"))
    return path


def test_tsmc_local_time_venues_and_functions(tmp_path):
    path = write_tsmc(tmp_path / "tsmc.txt", TSMC_ROWS)
    data = load_records(DataConfig(source="foursquare_tsmc", path=str(path)))
    assert data.n_users == 2 and len(data.locations) == 4 and len(data.records) == 5
    assert_sorted_by_user_time(data.records)
    fmt = "%a %b %d %H:%M:%S +0000 %Y"
    expected = sorted((r[0], dt.datetime.strptime(r[7], fmt) + dt.timedelta(minutes=int(r[6]))) for r in TSMC_ROWS)
    got = [(u, ts.to_pydatetime()) for u, ts in zip(data.records["user"], data.records["timestamp"])]
    assert [g[1] for g in got] == [e[1] for e in expected]
    loc = data.locations.set_index("name")
    shop = loc.loc["49bbd6c0f964a520f4531fe3"]
    assert shop["lat"] == pytest.approx(40.719811) and shop["function"] == "Commercial"
    assert loc.loc["4d0cc47f903d37041864bf55", "category"] == "Café"  # latin-1 read correctly
    assert loc.loc["4c5cc7b485a1e21e00d35711", "function"] == "Residential"


def test_tsmc_bad_inputs(tmp_path):
    bad_time = list(TSMC_ROWS[0][:7]) + ["Tue 2012-04-03 18:00"]
    with pytest.raises(DataError, match=r"utc_time.*line 2.*Tue 2012-04-03 18:00"):
        load_records(DataConfig(source="foursquare_tsmc",
                                path=str(write_tsmc(tmp_path / "a.txt", [TSMC_ROWS[0], tuple(bad_time)]))))
    bad_lat = list(TSMC_ROWS[0]); bad_lat[4] = "140.2"
    with pytest.raises(DataError, match=r"out-of-range coordinates.*140\.2"):
        load_records(DataConfig(source="foursquare_tsmc", path=str(write_tsmc(tmp_path / "b.txt", [tuple(bad_lat)]))))
    with pytest.raises(DataError, match="found 7 tab-separated columns, expected 8"):
        load_records(DataConfig(source="foursquare_tsmc",
                                path=str(write_tsmc(tmp_path / "c.txt", [TSMC_ROWS[0][:7]]))))


# ---------------------------------------------------------------------------------------------------
# csv
# ---------------------------------------------------------------------------------------------------

def test_csv_lat_lon_with_location_and_category(tmp_path):
    frame = pd.DataFrame({
        "who": ["b", "a", "a", "b", "a"],
        "when": ["2020-01-01 10:00", "2020-01-01 09:00", "2020-01-01 08:00", "2020-01-02 10:00", "2020-01-03 08:00"],
        "la": [35.0, 35.01, 35.0, 35.0, 35.02], "lo": [139.0, 139.01, 139.0, 139.0, 139.02],
        "place": ["p1", "p2", "p1", "p1", "p3"], "kind": ["Bar", "University", "Bar", "Ramen Restaurant", "Zzz"],
    })
    frame.to_csv(tmp_path / "c.csv", index=False)
    cols = CsvColumns(user="who", timestamp="when", lat="la", lon="lo", location="place", category="kind")
    data = load_records(DataConfig(source="csv", path=str(tmp_path / "c.csv"), csv=cols))
    rec, loc = data.records, data.locations
    assert loc["name"].tolist() == ["p1", "p2", "p3"]
    assert loc["function"].tolist() == ["Entertainment", "Education", UNKNOWN_FUNCTION]  # p1: Bar twice
    assert rec["user"].tolist() == [0, 0, 0, 1, 1]
    assert rec["location"].tolist() == [0, 1, 2, 0, 0]
    assert rec["timestamp"].iloc[0] == pd.Timestamp("2020-01-01 08:00")
    x, y = project_to_plane(frame["la"], frame["lo"])  # the plane is centred on the records' mean
    assert (loc["x"][2], loc["y"][2]) == pytest.approx((x[4], y[4]))
    assert (rec["x"].iloc[0], rec["y"].iloc[0]) == pytest.approx((x[2], y[2]))
    d_plane = math.hypot(loc["x"][0] - loc["x"][2], loc["y"][0] - loc["y"][2])
    assert d_plane == pytest.approx(haversine_m(35.0, 139.0, 35.02, 139.02), rel=5e-3)


def test_csv_xy_without_location_and_unix_times(tmp_path):
    pd.DataFrame({"user": [1, 1, 2, 2], "timestamp": [1_600_000_000, 1_600_003_600, 1_600_000_000, 1_600_000_060],
                  "x": [0.0, 100.0, 0.0, 0.0], "y": [0.0, 50.0, 0.0, 0.0]}).to_csv(tmp_path / "c.csv", index=False)
    cols = CsvColumns(x="x", y="y")
    data = load_records(DataConfig(source="csv", path=str(tmp_path / "c.csv"), csv=cols))
    assert len(data.locations) == 2  # identical coordinates are one location
    assert data.records["location"].tolist() == [0, 1, 0, 0]
    assert data.records["timestamp"].iloc[1] == pd.Timestamp("2020-09-13 13:26:40")
    assert data.records["lat"].isna().all() and (data.records["function"] == UNKNOWN_FUNCTION).all()


@pytest.mark.parametrize("content, pattern", [
    ("usr,timestamp,lat,lon\n1,2020-01-01,1,1\n", r"missing column.*\['user'\].*found.*'usr'"),
    ("user,timestamp,lat,lon\n1,2020-01-01,1,1\n1,soon,1,1\n", r"'timestamp'.*row 2.*'soon'"),
    ("user,timestamp,lat,lon\n1,2020-01-01,1,1\n1,2020-01-02,,1\n", r"out-of-range.*row 2"),
    ("user,timestamp,lat,lon\n1,2020-01-01,91,1\n", r"latitude in \[-90, 90\]"),
    ("user,timestamp,lat,lon\n1,2020-01-01,1,-181\n", r"longitude in \[-180, 180\]"),
    ("user,timestamp,lat,lon\n", r"no records left"),
    ('user,timestamp,lat,lon\n1,"2020-01-01,1,1\n', r"could not be read"),
])
def test_csv_bad_inputs(tmp_path, content, pattern):
    (tmp_path / "c.csv").write_text(content)
    with pytest.raises(DataError, match=pattern):
        load_records(DataConfig(source="csv", path=str(tmp_path / "c.csv")))


def test_csv_nan_xy(tmp_path):
    (tmp_path / "c.csv").write_text("user,timestamp,x,y\n1,2020-01-01,1,1\n1,2020-01-02,2,nan\n")
    with pytest.raises(DataError, match=r"column 'y'.*missing or non-numeric.*row 2"):
        load_records(DataConfig(source="csv", path=str(tmp_path / "c.csv"), csv=CsvColumns(x="x", y="y")))


# ---------------------------------------------------------------------------------------------------
# describe
# ---------------------------------------------------------------------------------------------------

def test_describe_counts_match_a_direct_count(tmp_path):
    path = write_humob(tmp_path / "h.csv", HUMOB_ROWS)
    data = load_records(DataConfig(source="humob", path=str(path), humob_grid=10))
    summary = describe(data)
    kept = [r for r in HUMOB_ROWS if r[3] != 999]
    assert summary["users"] == len({r[0] for r in kept}) and summary["records"] == len(kept)
    assert summary["locations"] == 100 and summary["locations_visited"] == len({(r[3], r[4]) for r in kept})
    assert summary["span_days"] == pytest.approx(2 + 47 / 48)
    assert summary["record_function_share"][UNKNOWN_FUNCTION] == 1.0
    assert sum(summary["location_function_share"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("source", ["nyc_foursquare", "synthetic"])
def test_next_visit_time_is_the_target_records_own_time(source):
    """The next visit's hour and weekday come from the window's last record (timestamp + duration) and must be
    the target record's own, on every window of every split of the real check-ins and a synthetic city."""
    cfg = DataConfig(source=source)
    windows = make_windows(load_records(cfg), cfg)
    for split in ("train", "val", "test"):
        n = windows.n_windows(split)
        batch = windows.batch(split, np.arange(n))
        target = windows.target_index(split)
        np.testing.assert_array_equal(batch["next_hour"], windows.hour[target])
        np.testing.assert_array_equal(batch["next_weekday"], windows.weekday[target])
    assert len(np.unique(batch["next_hour"])) > 12          # not a constant that happens to match
