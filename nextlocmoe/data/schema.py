"""The one record schema every data source produces, and the names the paper's experts carry.

A source returns a `MobilityData`: a record table (one row per visit, sorted by user then time) and a
location table (the candidate set: every venue or grid cell of the dataset).

Record table columns
    user       int64    user id (0..U-1); after sub-user cutting, windows never cross users
    timestamp  datetime64[ns]  local time of the visit
    x, y       float64  metres on a local plane centred on the dataset (east, north)
    lat, lon   float64  degrees when known (NaN for grid data)
    location   int64    row index into the location table
    function   string   one of FUNCTIONS, or "Unknown"

Location table columns (row i is location i)
    x, y, lat, lon, function   as above
    name                       the source's own id of the place (venue "lat lon", grid cell "cx,cy")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError

# The five location functions of the Location Semantics MoE (paper, Sec. 4.1).
FUNCTIONS = ("Entertainment", "Commercial", "Education", "Public", "Residential")
UNKNOWN_FUNCTION = "Unknown"

# The eleven user roles of the Personalized MoE (paper, Sec. 4.2).
ROLES = ("Student", "Teacher", "Office Worker", "Visitor", "Night Shift Worker", "Remote Worker",
         "Service Industry Worker", "Public Service Official", "Fitness Enthusiast", "Retail Employee",
         "Undefined")

RECORD_COLUMNS = ("user", "timestamp", "x", "y", "lat", "lon", "location", "function")
LOCATION_COLUMNS = ("x", "y", "lat", "lon", "function", "name")


@dataclass
class MobilityData:
    """Records plus candidate locations of one dataset, with where they came from."""

    name: str                      # source name, e.g. "nyc_foursquare"
    records: pd.DataFrame          # RECORD_COLUMNS, sorted by (user, timestamp)
    locations: pd.DataFrame        # LOCATION_COLUMNS, row i = location id i
    source: str                    # file the records were read from ("generated" for synthetic)
    checksum: str                  # sha256 of the raw file (or of the generator's parameters)
    truth: dict[str, Any] = field(default_factory=dict)  # known ground truth, e.g. {"user_role": Series}

    def __post_init__(self) -> None:
        validate(self)

    @property
    def n_users(self) -> int:
        return int(self.records["user"].nunique())


def validate(data: MobilityData) -> None:
    """Check the schema contract; raise DataError naming the dataset and the column at fault."""
    where = f"dataset '{data.name}' (from {data.source})"
    rec, loc = data.records, data.locations
    missing = [c for c in RECORD_COLUMNS if c not in rec.columns]
    if missing:
        raise DataError(f"{where}: record table lacks columns {missing}; expected {list(RECORD_COLUMNS)}")
    missing = [c for c in LOCATION_COLUMNS if c not in loc.columns]
    if missing:
        raise DataError(f"{where}: location table lacks columns {missing}; expected {list(LOCATION_COLUMNS)}")
    if len(rec) == 0:
        raise DataError(f"{where}: no records left after filtering")
    if not pd.api.types.is_datetime64_any_dtype(rec["timestamp"]):
        raise DataError(f"{where}: column 'timestamp' must be datetime64, got {rec['timestamp'].dtype}")
    for col in ("x", "y"):
        if not np.isfinite(rec[col].to_numpy(dtype=float)).all():
            raise DataError(f"{where}: column '{col}' holds NaN or infinite metres")
    ids = rec["location"].to_numpy()
    if ids.min() < 0 or ids.max() >= len(loc):
        raise DataError(f"{where}: column 'location' must index the {len(loc)} locations")
    bad = set(rec["function"].unique()) - set(FUNCTIONS) - {UNKNOWN_FUNCTION}
    if bad:
        raise DataError(f"{where}: column 'function' holds {sorted(bad)[:5]}; expected one of "
                        f"{list(FUNCTIONS) + [UNKNOWN_FUNCTION]}")
