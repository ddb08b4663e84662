"""The natural-language texts NextLocMoE reads through its frozen backbone (paper Sec. 4).

Three kinds of text enter the model, always through the backbone's frozen input-embedding table (a table
lookup, no transformer pass):

- `TASK_PROMPT`: a fixed instruction placed before the trajectory tokens (paper Sec. 4, "prompt").
- `FUNCTION_DESCRIPTIONS`: one paragraph per location function; its mean-pooled embedding initialises the
  coordinate projection of that function's expert in the Location Semantics MoE (paper Sec. 4.1).
- `ROLE_DESCRIPTIONS`: one paragraph per user role; its mean-pooled embedding is the fixed key that the
  Personalized MoE gate compares a token with (paper Sec. 4.2).

The paper publishes the idea of these texts, not a wording we could reuse; every text below is written for
this project. Keys match `nextlocmoe.data.schema.FUNCTIONS` and `ROLES` exactly (a test checks it).
"""

from __future__ import annotations

from ..data.schema import ROLES
from ..errors import ConfigError

TASK_PROMPT = (
    "You are given the recent movements of one person in a city. Each step is a visit: where it happened "
    "on a map measured in metres, the day of the week, the hour of the day, and how long the person stayed "
    "before moving on. The first part is the long-term history of this person; the last few steps are the "
    "trip happening now. Using the habits you can see in the history and the direction of the current trip, "
    "work out the place this person will visit next."
)

FUNCTION_DESCRIPTIONS: dict[str, str] = {
    "Entertainment": (
        "A place people go to enjoy their free time: cinemas, theatres, concert halls, bars, night clubs, "
        "museums, stadiums and amusement parks. Visits cluster in the evenings and at weekends, last a few "
        "hours, and are often made with friends or family rather than alone."
    ),
    "Commercial": (
        "A place where goods and services are bought and sold: shops, malls, markets, restaurants, cafes, "
        "banks and offices of private firms. It is busy through the working day and at lunch time, draws "
        "both workers who stay for hours and customers who come and go within minutes."
    ),
    "Education": (
        "A place of teaching and learning: schools, colleges, universities, libraries and training centres. "
        "Students and staff arrive in the morning on school days, stay for most of the day, and the place is "
        "quiet at night, at weekends and during holidays."
    ),
    "Public": (
        "A place that serves the whole community: hospitals, clinics, government offices, police and fire "
        "stations, transit stations, parks and squares. People pass through at any hour for short, "
        "purposeful visits, while the people who work there keep long shifts."
    ),
    "Residential": (
        "A place where people live: houses, apartment blocks and dormitories. It is where most trips begin "
        "and end each day; people return in the evening, stay overnight, and leave again in the morning, and "
        "they spend long stretches of the weekend there."
    ),
}

ROLE_DESCRIPTIONS: dict[str, str] = {
    "Student": (
        "A young person enrolled at a school or university. On weekdays they travel from home to campus in "
        "the morning, move between lecture halls, libraries and canteens, and go out to cafes, sports or "
        "entertainment in the evening and at weekends."
    ),
    "Teacher": (
        "Someone who teaches at a school or university. They reach the same campus early on every working "
        "day, stay until the afternoon, and otherwise keep a settled pattern of home, shopping and family "
        "outings."
    ),
    "Office Worker": (
        "An employee with a desk job on regular hours. They commute from home to the same office in the "
        "morning, go out for lunch nearby, return home in the early evening, and spend weekends on shopping "
        "and leisure."
    ),
    "Visitor": (
        "Someone new to the city, such as a tourist or a person on a short business trip. They stay at a "
        "hotel, move between sights, restaurants and shops they have not seen before, and follow no "
        "repeating weekly routine."
    ),
    "Night Shift Worker": (
        "Someone whose working hours fall at night, for example in a hospital, a factory, security or "
        "transport. They leave home in the evening, work until the early morning, and sleep and run errands "
        "during the day."
    ),
    "Remote Worker": (
        "Someone who works from home or from changing cafes and shared offices. Much of the day is spent "
        "near home, with short trips for food, exercise and errands scattered across the day instead of a "
        "fixed commute."
    ),
    "Service Industry Worker": (
        "Someone who works in a restaurant, hotel, salon or similar service business. Their shifts often "
        "cover lunch, evenings and weekends, when others are at leisure, and their days off fall on "
        "weekdays."
    ),
    "Public Service Official": (
        "Someone employed by a public body, such as a government office, a court, the police or a public "
        "utility. They keep regular weekday hours at an official building and sometimes travel to other "
        "public sites on duty."
    ),
    "Fitness Enthusiast": (
        "Someone for whom exercise is part of every day. Around work or study they regularly visit gyms, "
        "sports grounds, pools, parks and running routes, often early in the morning or after work."
    ),
    "Retail Employee": (
        "Someone who works in a shop or a shopping centre. They commute to the same store for shifts that "
        "follow opening hours, including late evenings and weekends, and spend breaks in the nearby food "
        "court or cafes."
    ),
    "Undefined": (
        "A person whose movements fit no clear pattern: the places, times and lengths of visits vary "
        "without an obvious routine, mixing work, errands, leisure and travel in changing proportions."
    ),
}


def role_names(num_experts: int) -> tuple[str, ...]:
    """The roles kept when the Personalized MoE has `num_experts` experts (the paper uses all 11).

    The "number of role experts" ablation keeps the first `num_experts - 1` roles in schema order and always
    keeps "Undefined", the catch-all role for behaviour no other role describes.
    """
    if not 1 <= num_experts <= len(ROLES):
        raise ConfigError(f"model.personalized.num_experts={num_experts} is invalid; expected 1..{len(ROLES)} "
                          "(one expert per user role)")
    if num_experts == len(ROLES):
        return ROLES
    return ROLES[: num_experts - 1] + ("Undefined",)
