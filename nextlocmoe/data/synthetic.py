"""A synthetic grid city in the HuMob format, with known cell functions and user roles.

The paper's two routers claim to discover structure that real data never label: the Location Semantics
MoE routes by the function of a place (Sec. 4.1) and the Personalized MoE by the role of a user
(Sec. 4.2). A generated city knows both, so routing can be checked against truth, and it builds in
seconds for tests, CI and cross-city zero-shot experiments (two `layout_seed`s = two cities).

The city (`draw_layout`): a grid whose cells carry one of the five FUNCTIONS, spatially structured:
a commercial core with a few sub-centres, compact education campuses, entertainment districts, public
service cells (a civic cluster plus scattered offices), and residential cells everywhere else.

The people (`generate_city`): each user has one of the 11 ROLES (balanced), a home (a residential
cell), a workplace or school of the role's function, and favourite leisure, shopping and errand cells,
each chosen near home. A role is a list of `Outing`s (what, on which days, how likely, when, how long)
over 48 half-hour slots; unplanned slots are spent at home. With probability `explore` an outing goes
to a random cell of the intended function instead of the usual one. Visitors roam: every outing goes to
a random entertainment or commercial cell anywhere in the city.

Records (HuMob-like, a few a day, not 48): one at the start of every stay (arriving somewhere, coming
home, or the second session of a long stay, e.g. back at school after lunch), one at the start of the
simulation, and one each day at the user's wake-up slot (the start of the day's stay at home), so that a
user who stays in never goes silent for more than a day. Output follows the HuMob convention:
`uid,d,t,x,y`, cells 1..grid, t = 30-minute slot 0..47, day 0 = a Monday.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..io import atomic_path
from .config import SyntheticConfig
from .schema import FUNCTIONS, ROLES

SLOTS_PER_DAY = 48  # HuMob: 30-minute slots

# Share of cells per function; Residential takes the rest (about 63 %), as in a typical city.
FUNCTION_SHARES = {"Education": 0.05, "Commercial": 0.14, "Entertainment": 0.10, "Public": 0.08}

# What a user does in a slot. WORK goes to the role's workplace or school; ROAM to a random cell.
HOME, WORK, LEISURE, SHOPPING, ERRAND, ROAM = range(6)
ACTIVITY_NAMES = ("home", "work", "leisure", "shopping", "errand", "roam")
ANCHOR_FUNCTION = {LEISURE: "Entertainment", SHOPPING: "Commercial", ERRAND: "Public"}  # favourite venues
ANCHOR_CANDIDATES = {WORK: 6, LEISURE: 6, SHOPPING: 12, ERRAND: 8}  # nearest of this many random cells
ROAM_FUNCTIONS = ("Entertainment", "Commercial")                    # where visitors wander


# ---------------------------------------------------------------------------------------------------
# Role schedules
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outing:
    """One planned activity; later outings of a role overwrite earlier ones where they overlap."""

    activity: int          # HOME, WORK, LEISURE, SHOPPING, ERRAND or ROAM
    days: str              # "weekday", "weekend" or "all" (day 0 is a Monday)
    prob: float            # chance the outing happens on such a day
    start: float           # mean start slot (17 = 08:30); the user's own rhythm and daily noise shift it
    start_sd: float        # day-to-day spread of the start, in slots
    duration: float        # mean length in slots; may run past midnight into the next day
    duration_sd: float     # day-to-day spread of the length, in slots
    session: float = 0.0   # slots after the start when a second session begins (a new stay, same place);
                           # 0 = one session. E.g. the afternoon at school after lunch.


@dataclass(frozen=True)
class RoleSchedule:
    """Where a role works (function -> probability) and its weekly plan of outings."""

    work: tuple[tuple[str, float], ...]  # workplace function(s); Residential = works from home
    wake: int                            # slot of the daily wake-up record (14 = 07:00)
    outings: tuple[Outing, ...]


_o = Outing

ROLE_SCHEDULES: dict[str, RoleSchedule] = {
    # weekday school 08:00-16:00, afternoon classes from 12:30; snacks and clubs after school
    "Student": RoleSchedule((("Education", 1.0),), 14, (
        _o(WORK, "weekday", 0.95, 16, 1, 16, 1, session=9), _o(SHOPPING, "weekday", 0.25, 34, 2, 3, 1),
        _o(LEISURE, "weekday", 0.30, 37, 2, 4, 1), _o(SHOPPING, "weekend", 0.40, 22, 3, 4, 1),
        _o(LEISURE, "weekend", 0.50, 28, 3, 6, 2))),
    # education too, but earlier and longer (07:00-17:00), some weekend preparation
    "Teacher": RoleSchedule((("Education", 1.0),), 12, (
        _o(WORK, "weekday", 0.97, 14, 1, 20, 2, session=11), _o(WORK, "weekend", 0.15, 18, 2, 8, 2),
        _o(SHOPPING, "weekday", 0.30, 36, 2, 2, 1), _o(SHOPPING, "weekend", 0.40, 22, 3, 4, 1),
        _o(LEISURE, "weekend", 0.30, 30, 3, 4, 1))),
    # office hours 08:30-17:30 in commercial or public offices; lunch out; evening leisure
    "Office Worker": RoleSchedule((("Commercial", 0.7), ("Public", 0.3)), 14, (
        _o(WORK, "weekday", 0.95, 17, 1, 18, 2, session=9), _o(SHOPPING, "weekday", 0.25, 24, 1, 2, 0.5),
        _o(LEISURE, "weekday", 0.20, 38, 2, 4, 1), _o(SHOPPING, "weekend", 0.50, 22, 3, 4, 1),
        _o(LEISURE, "weekend", 0.40, 30, 3, 6, 2), _o(ERRAND, "weekend", 0.10, 20, 2, 2, 1))),
    # no routine: three outings a day to random entertainment/commercial cells anywhere
    "Visitor": RoleSchedule((("Residential", 1.0),), 16, (
        _o(ROAM, "all", 0.90, 19, 3, 6, 2), _o(ROAM, "all", 0.80, 27, 3, 6, 2),
        _o(ROAM, "all", 0.70, 37, 3, 6, 2))),
    # night shift 22:00-06:00 (hospitals, transport, depots), a break at 02:00; sleeps by day
    "Night Shift Worker": RoleSchedule((("Public", 0.5), ("Commercial", 0.5)), 28, (
        _o(WORK, "weekday", 0.93, 44, 1, 16, 1, session=8), _o(WORK, "weekend", 0.30, 44, 1, 16, 1, session=8),
        _o(SHOPPING, "weekday", 0.30, 31, 2, 2, 1), _o(LEISURE, "weekend", 0.30, 33, 2, 4, 1))),
    # works from home; short trips to the nearby shop or cafe, some leisure
    "Remote Worker": RoleSchedule((("Residential", 1.0),), 15, (
        _o(SHOPPING, "all", 0.60, 24, 4, 2, 1), _o(LEISURE, "weekday", 0.20, 36, 2, 3, 1),
        _o(LEISURE, "weekend", 0.30, 28, 3, 4, 1), _o(ERRAND, "weekday", 0.08, 20, 3, 2, 1))),
    # late shifts 14:00-23:00 in shops, restaurants, hotels, weekends included; a dinner break at 18:30
    "Service Industry Worker": RoleSchedule((("Commercial", 1.0),), 18, (
        _o(WORK, "weekday", 0.85, 28, 2, 18, 2, session=9), _o(WORK, "weekend", 0.70, 26, 2, 18, 2, session=9),
        _o(SHOPPING, "all", 0.20, 21, 2, 2, 1))),
    # public offices 08:00-16:30, afternoon from 12:30
    "Public Service Official": RoleSchedule((("Public", 1.0),), 13, (
        _o(WORK, "weekday", 0.95, 16, 1, 17, 1, session=9), _o(SHOPPING, "weekday", 0.20, 36, 2, 2, 1),
        _o(SHOPPING, "weekend", 0.40, 20, 3, 4, 1), _o(LEISURE, "weekend", 0.40, 26, 3, 6, 2))),
    # gym or park at 06:00 and 18:30, an office job in between, long weekend sessions
    "Fitness Enthusiast": RoleSchedule((("Commercial", 0.5), ("Public", 0.5)), 11, (
        _o(LEISURE, "all", 0.80, 12, 1, 3, 1), _o(WORK, "weekday", 0.90, 18, 1, 16, 2, session=8),
        _o(LEISURE, "weekday", 0.70, 37, 2, 3, 1), _o(LEISURE, "weekend", 0.60, 20, 2, 6, 2))),
    # shop hours 09:30-17:30, weekends included
    "Retail Employee": RoleSchedule((("Commercial", 1.0),), 15, (
        _o(WORK, "all", 0.78, 19, 2, 16, 2, session=8), _o(LEISURE, "all", 0.20, 38, 2, 4, 1))),
    # a bit of everything, loosely timed
    "Undefined": RoleSchedule(tuple((f, 0.2) for f in FUNCTIONS), 15, (
        _o(WORK, "all", 0.40, 18, 4, 10, 4), _o(ERRAND, "all", 0.30, 20, 6, 2, 1),
        _o(SHOPPING, "all", 0.40, 24, 6, 3, 2), _o(LEISURE, "all", 0.40, 32, 6, 4, 2))),
}
assert tuple(ROLE_SCHEDULES) == ROLES
SECOND_SESSION = 32  # event id offset of an outing's second session (outing ids are 1..31)


# ---------------------------------------------------------------------------------------------------
# The city layout
# ---------------------------------------------------------------------------------------------------

def check_config(cfg: SyntheticConfig) -> None:
    checks = [("grid", cfg.grid >= 5, "an integer >= 5"), ("cell_m", cfg.cell_m > 0, "metres > 0"),
              ("users", cfg.users >= 1, "an integer >= 1"), ("days", cfg.days >= 1, "an integer >= 1"),
              ("explore", 0.0 <= cfg.explore <= 1.0, "a probability in [0, 1]")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"data.synthetic.{name}={getattr(cfg, name)!r} is invalid; expected {expected}")


def _bumps(grid: int, centres: np.ndarray, sigma: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Sum of K Gaussian bumps over the cells: a smooth 'attractiveness' field, (grid*grid,) row-major.

    A 2-D Gaussian is a product of two 1-D ones, so the sum is one (G, K) @ (K, G) matrix product.
    """
    axis = np.arange(grid, dtype=np.float64)
    along_row = np.exp(-(axis[None, :] - centres[:, 0:1]) ** 2 / (2 * sigma[:, None] ** 2))  # (K, G) over y
    along_col = np.exp(-(axis[None, :] - centres[:, 1:2]) ** 2 / (2 * sigma[:, None] ** 2))  # (K, G) over x
    return ((along_row * weight[:, None]).T @ along_col).ravel()                          # (G*G,)


def draw_layout(grid: int, layout_seed: int) -> np.ndarray:
    """Function index (into FUNCTIONS) of every cell, (grid*grid,) in location-id order (row-major, y then x).

    Each non-residential function gets a smooth field of Gaussian bumps plus a little noise and takes
    its quota of the highest-scoring free cells, in the order Education, Commercial, Entertainment,
    Public: campuses are tight clusters, commerce a core with sub-centres, entertainment a few districts,
    public services a civic cluster plus cells scattered by the noise term.
    """
    rng = np.random.default_rng([layout_seed, 0x1A7])
    n = grid * grid
    centre = grid / 2 + rng.normal(0, 0.05 * grid, 2)                    # the city's core, near the middle

    def uniform_centres(k: int) -> np.ndarray:
        return rng.uniform(0.1 * grid, 0.9 * grid, size=(k, 2))

    quota = {f: max(1, int(round(share * n))) for f, share in FUNCTION_SHARES.items()}
    n_campus = max(1, int(round(quota["Education"] / 6)))
    sub_centres = uniform_centres(3)
    districts = uniform_centres(4)
    civic = centre + rng.normal(0, 0.08 * grid, 2)
    fields = {
        "Education": _bumps(grid, uniform_centres(n_campus), np.full(n_campus, 1.0), np.ones(n_campus))
                     + 0.01 * rng.random(n),
        "Commercial": _bumps(grid, np.vstack([centre, sub_centres]),
                             np.array([max(0.12 * grid, 1.0)] + [max(0.05 * grid, 0.8)] * 3),
                             np.array([1.0, 0.6, 0.6, 0.6])) + 0.05 * rng.random(n),
        "Entertainment": _bumps(grid, districts, np.full(4, max(0.05 * grid, 0.8)), np.ones(4))
                         + 0.10 * rng.random(n),
        "Public": _bumps(grid, civic[None, :], np.array([max(0.04 * grid, 0.8)]), np.ones(1))
                  + 0.9 * rng.random(n),
    }
    function = np.full(n, FUNCTIONS.index("Residential"), dtype=np.int8)
    free = np.ones(n, dtype=bool)
    for name in ("Education", "Commercial", "Entertainment", "Public"):
        score = np.where(free, fields[name], -np.inf)
        chosen = np.argsort(-score, kind="stable")[: quota[name]]
        function[chosen] = FUNCTIONS.index(name)
        free[chosen] = False
    return function


# ---------------------------------------------------------------------------------------------------
# The people
# ---------------------------------------------------------------------------------------------------

@dataclass
class SyntheticCity:
    """A generated city: HuMob-format records plus the truth behind them."""

    config: SyntheticConfig
    records_humob: pd.DataFrame    # uid, d, t, x, y (int64; cells 1..grid, t 0..47), sorted by uid, d, t
    cell_function: np.ndarray      # (grid*grid,) function name per cell, location id = (y-1)*grid + (x-1)
    user_role: pd.Series           # uid -> role name
    user_home: np.ndarray          # (users,) home cell id
    user_work: np.ndarray          # (users,) workplace/school cell id (home for remote workers, visitors)


def _nearest_of_random(rng: np.random.Generator, cells: np.ndarray, origin: np.ndarray, grid: int,
                       k: int) -> np.ndarray:
    """For each origin cell, the nearest of k cells drawn at random from `cells`: near, but not always
    the nearest, as people pick places close to home. (U,) cell ids."""
    draws = cells[rng.integers(0, len(cells), size=(len(origin), k))]  # (U, k)
    dy = draws // grid - (origin // grid)[:, None]
    dx = draws % grid - (origin % grid)[:, None]
    return draws[np.arange(len(origin)), np.argmin(dx * dx + dy * dy, axis=1)]


def _paint_outing(activity: np.ndarray, event: np.ndarray, outing: Outing, event_id: int, offset: np.ndarray,
                  is_weekday: np.ndarray, rng: np.random.Generator) -> None:
    """Write one outing into the (n, D, 48) activity plan of a role's users, spilling past midnight.

    `event` records which outing (and which of its sessions) fills each slot, so that stays can be told
    apart even when two follow each other at the same place.
    """
    n, days, slots = activity.shape
    day_ok = {"weekday": is_weekday, "weekend": ~is_weekday, "all": np.ones(days, dtype=bool)}[outing.days]
    happens = (rng.random((n, days)) < outing.prob) & day_ok[None, :]                        # (n, D)
    start = np.rint(outing.start + offset[:, None] + rng.normal(0, outing.start_sd, (n, days)))
    start = np.clip(start, 0, slots - 1).astype(np.int64)                                     # (n, D)
    length = np.rint(outing.duration + rng.normal(0, outing.duration_sd, (n, days)))
    length = np.clip(length, 1, slots - 1).astype(np.int64)                                  # (n, D)
    end = start + length
    second = start + (np.rint(outing.session + rng.normal(0, 1, (n, days))) if outing.session > 0
                      else slots * 2)                                                         # (n, D)
    slot = np.arange(slots)
    today = happens[..., None] & (slot >= start[..., None]) & (slot < end[..., None])       # (n, D, 48)
    today_second = slot >= second[..., None]
    tomorrow = happens[..., None] & (slot < (end - slots)[..., None])                       # spill into d+1
    tomorrow_second = slot >= (second - slots)[..., None]
    tomorrow[:, -1] = False
    ids = np.where(today_second, event_id + SECOND_SESSION, event_id).astype(np.int8)        # (n, D, 48)
    ids[:, 1:] = np.where(tomorrow[:, :-1], np.where(tomorrow_second[:, :-1], event_id + SECOND_SESSION,
                                                     event_id), ids[:, 1:])
    today[:, 1:] |= tomorrow[:, :-1]
    activity[today] = outing.activity
    event[today] = ids[today]


def generate_city(cfg: SyntheticConfig) -> SyntheticCity:
    """Generate a city and its users' records (see the module docstring); vectorised over users."""
    check_config(cfg)
    grid, n_users, days = cfg.grid, cfg.users, cfg.days
    function = draw_layout(grid, cfg.layout_seed)                         # (L,) index into FUNCTIONS
    cells_of = {f: np.flatnonzero(function == i) for i, f in enumerate(FUNCTIONS)}
    rng = np.random.default_rng([cfg.seed, 0x5E7])

    # --- who: roles (balanced), homes, workplaces and favourite venues -----------------------------
    role = rng.permutation(np.arange(n_users) % len(ROLES))               # (U,) index into ROLES
    home = cells_of["Residential"][rng.integers(0, len(cells_of["Residential"]), n_users)]
    work_function = np.empty(n_users, dtype=object)
    for r, name in enumerate(ROLES):
        members = np.flatnonzero(role == r)
        options, probs = zip(*ROLE_SCHEDULES[name].work)
        work_function[members] = np.asarray(options, dtype=object)[
            rng.choice(len(options), size=len(members), p=np.asarray(probs) / sum(probs))]
    anchor = np.tile(home[:, None], (1, len(ACTIVITY_NAMES)))            # (U, 6) cell per activity
    anchor_function = np.full((n_users, len(ACTIVITY_NAMES)), FUNCTIONS.index("Residential"), dtype=np.int64)
    for f in FUNCTIONS:
        members = np.flatnonzero(work_function == f)
        if f != "Residential":  # remote workers and visitors "work" at home
            anchor[members, WORK] = _nearest_of_random(rng, cells_of[f], home[members], grid,
                                                       ANCHOR_CANDIDATES[WORK])
        anchor_function[members, WORK] = FUNCTIONS.index(f)
    for activity, f in ANCHOR_FUNCTION.items():
        anchor[:, activity] = _nearest_of_random(rng, cells_of[f], home, grid, ANCHOR_CANDIDATES[activity])
        anchor_function[:, activity] = FUNCTIONS.index(f)
    rhythm = rng.normal(0, 1.0, n_users)                                  # (U,) personal shift, slots
    wake_of_role = np.array([ROLE_SCHEDULES[name].wake for name in ROLES])
    wake = wake_of_role[role] + np.rint(rhythm).astype(np.int64)         # (U,) slot of the daily record
    wake = np.clip(wake, 0, SLOTS_PER_DAY - 1)

    # --- when: the activity plan, (U, D, 48) ------------------------------------------------------
    activity = np.zeros((n_users, days, SLOTS_PER_DAY), dtype=np.int8)   # HOME everywhere to start
    event = np.zeros((n_users, days, SLOTS_PER_DAY), dtype=np.int8)      # which outing (0 = none)
    is_weekday = np.arange(days) % 7 < 5                                  # day 0 is a Monday
    big = n_users * days > 200_000
    for r, name in enumerate(tqdm(ROLES, desc="synthetic city: schedules", disable=not big)):
        members = np.flatnonzero(role == r)
        if len(members) == 0:
            continue
        plan, plan_event = activity[members], event[members]             # copies, written back below
        for k, outing in enumerate(ROLE_SCHEDULES[name].outings, start=1):
            _paint_outing(plan, plan_event, outing, k, rhythm[members], is_weekday, rng)
        activity[members], event[members] = plan, plan_event

    # --- where: one cell per stay (a run of slots with the same activity and session) ------------
    # Exploration is drawn once per (user, day, outing), so both sessions of an outing, and its part
    # after a lunch break, are at the same place.
    total = days * SLOTS_PER_DAY
    act = activity.reshape(n_users, total)
    evt = event.reshape(n_users, total)
    run_start = np.ones((n_users, total), dtype=bool)
    run_start[:, 1:] = (act[:, 1:] != act[:, :-1]) | (evt[:, 1:] != evt[:, :-1])
    position = np.flatnonzero(run_start)                                  # (R,) flat index user*total+slot
    run_user, run_slot = np.divmod(position, total)
    run_activity = act.ravel()[position].astype(np.int64)
    run_outing = evt.ravel()[position].astype(np.int64) % SECOND_SESSION  # (R,) 0 = home, else outing id
    # the day an outing began, also for its second session after midnight (night shifts)
    continues = np.zeros(len(position), dtype=bool)
    continues[1:] = (run_user[1:] == run_user[:-1]) & (run_outing[1:] == run_outing[:-1]) & (run_outing[1:] > 0)
    first_run = np.flatnonzero(~continues)
    run_day = (run_slot // SLOTS_PER_DAY)[first_run][np.cumsum(~continues) - 1]
    n_outings = 1 + max(len(schedule.outings) for schedule in ROLE_SCHEDULES.values())
    outing_key = ((run_user * days) + run_day) * n_outings + run_outing  # (R,) index of (user, day, outing)
    explore_draw = rng.random(n_users * days * n_outings)[outing_key]    # < explore: go somewhere new
    place_draw = rng.random(n_users * days * n_outings)[outing_key]      # which cell, if so
    roam_draw = rng.random(n_users * days * n_outings)[outing_key]       # visitors: which function
    run_function = anchor_function[run_user, run_activity]
    roam = run_activity == ROAM
    run_function[roam] = np.where(roam_draw[roam] < 0.5, FUNCTIONS.index(ROAM_FUNCTIONS[0]),
                                  FUNCTIONS.index(ROAM_FUNCTIONS[1]))
    random_place = roam | ((explore_draw < cfg.explore) & (run_activity != HOME))
    run_cell = anchor[run_user, run_activity]                             # (R,) the usual place
    for i, f in enumerate(FUNCTIONS):
        pick = np.flatnonzero(random_place & (run_function == i))
        index = np.minimum((place_draw[pick] * len(cells_of[f])).astype(np.int64), len(cells_of[f]) - 1)
        run_cell[pick] = cells_of[f][index]

    # --- records: the start of every stay, and a daily wake-up record ------------------------------
    is_record = np.zeros((n_users, days, SLOTS_PER_DAY), dtype=bool)
    is_record[np.arange(n_users)[:, None], np.arange(days)[None, :], wake[:, None]] = True
    is_record = is_record.reshape(-1)
    is_record[position] = True
    record = np.flatnonzero(is_record)                                    # sorted: by user, then time
    cell = run_cell[np.searchsorted(position, record, side="right") - 1]
    uid, slot = np.divmod(record, total)
    d, t = np.divmod(slot, SLOTS_PER_DAY)
    y, x = np.divmod(cell, grid)
    records = pd.DataFrame({"uid": uid, "d": d, "t": t, "x": x + 1, "y": y + 1}).astype(np.int64)

    return SyntheticCity(
        config=cfg,
        records_humob=records,
        cell_function=np.asarray(FUNCTIONS, dtype=object)[function],
        user_role=pd.Series(np.asarray(ROLES, dtype=object)[role], index=pd.RangeIndex(n_users, name="uid"),
                            name="role"),
        user_home=home,
        user_work=anchor[:, WORK].copy(),
    )


def write_humob_csv(city: SyntheticCity, path: str | Path) -> Path:
    """Write the records as a HuMob CSV (`uid,d,t,x,y`, header included), atomically."""
    with atomic_path(path) as tmp:
        city.records_humob.to_csv(tmp, index=False, columns=["uid", "d", "t", "x", "y"])
    return Path(path)
