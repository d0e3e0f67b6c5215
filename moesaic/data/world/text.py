"""General text about the world and beyond it, and a held-out out-of-distribution generator.

In-distribution general text (`general_document`) mixes four genres, each with its own
templates: short stories about named people, facts and relations between invented entities
(kinship, places, ages, with the consequences spelled out), counting and comparisons
(arithmetic in words and digits), and facts about the visual world (shapes, colours, sizes).
Its vocabulary and syntax are much broader than captions': pronouns, tenses, subordinate
clauses, hundreds of content words.

Out-of-distribution text (`ood_document`) uses different genres and templates — weather
reports, recipes, match reports, letters — and content words that never occur in general text,
so its perplexity measures generalisation beyond the training distribution.
"""

from __future__ import annotations

import random

from moesaic.data.world.captions import NUMBER_WORDS
from moesaic.data.world.scenes import COLOURS, SHAPES


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


NAMES = _words(
    "Anna Ben Clara David Emma Felix Greta Hugo Ida Jonas Kira Leo Mia Noah Olga Paul "
    "Rosa Sam Tara Umar Vera Will Yara Zoe Mara Theo Lina Omar Nora Ivan Elsa Tom Lucy "
    "Max Ada"
)
PLACES = _words(
    "market garden library harbour forest station kitchen school bakery river bridge "
    "museum village hill farm beach castle park square workshop tower meadow lake cave "
    "orchard"
)
THINGS = _words(
    "ball box book lamp kite cup basket key letter map hat coat bottle drum flute ladder "
    "bicycle candle blanket shovel bucket rope bell clock mirror painting jar wagon boat"
)
ANIMALS = _words("cat dog horse goat owl fox rabbit duck mouse sheep crow frog bee deer")
FOODS = _words("apples pears plums cherries carrots onions eggs nuts lemons figs grapes beans")
ADJECTIVES = _words(
    "old new heavy light bright quiet noisy warm cold tiny huge shiny dusty broken "
    "strange lovely simple wooden golden tall narrow"
)
FEELINGS = ["happy", "tired", "curious", "worried", "proud", "surprised", "calm", "excited", "sad"]
VERBS = (  # (present, past)
    ("find", "found"),
    ("carry", "carried"),
    ("paint", "painted"),
    ("lose", "lost"),
    ("build", "built"),
    ("clean", "cleaned"),
    ("fix", "fixed"),
    ("hide", "hid"),
    ("sell", "sold"),
    ("buy", "bought"),
    ("open", "opened"),
    ("drop", "dropped"),
)
TIMES = [
    "One morning",
    "Later that day",
    "In the evening",
    "On Sunday",
    "After lunch",
    "Long ago",
    "Yesterday",
]
_SYL_A = _words("ka lo mi ter va ro su den bri ash mor el fen gal hu")
_SYL_B = ["ren", "dor", "wick", "ton", "mar", "lia", "sen", "bury", "vale", "holm", "stad", "ria"]


def entity(rng: random.Random) -> str:
    """An invented proper name for a town or country (e.g. 'Terwick')."""
    return (rng.choice(_SYL_A) + rng.choice(_SYL_B)).capitalize()


def _story(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    place, place2 = rng.sample(PLACES, 2)
    thing, thing2 = rng.sample(THINGS, 2)
    adj = rng.choice(ADJECTIVES)
    verb, past = rng.choice(VERBS)
    animal = rng.choice(ANIMALS)
    colour = rng.choice(COLOURS)
    pool = [
        f"{rng.choice(TIMES)}, {a} walked to the {place} with a {adj} {thing}.",
        f"There {a} met {b}, who was looking for a {colour} {thing2}.",
        f"{b} said that the {thing2} had been lost near the {place2}.",
        f"They decided to {verb} it together before it got dark.",
        f"A {animal} followed them all the way, and {a} laughed.",
        f"When they reached the {place2}, {b} felt {rng.choice(FEELINGS)}.",
        f"{a} {past} the {thing} and gave it to {b}.",
        f"Nobody knew why the {thing2} was {colour}, but everyone liked it.",
        f"In the end, {b} thanked {a} and went home.",
        f"The next day {a} told the story to a {animal} who lived by the {place}.",
        f"It was the most {adj} {thing} that {b} had ever seen.",
        f"{b} asked whether the {thing} was {adj}, and {a} said it was not.",
    ]
    first, rest = pool[0], pool[1:]
    n = rng.randint(3, 8)
    body = [first] + sorted(rng.sample(rest, min(n, len(rest))), key=rest.index)
    return " ".join(body)


def _relations(rng: random.Random) -> str:
    people = rng.sample(NAMES, 4)
    towns = [entity(rng) for _ in range(3)]
    ages = sorted(rng.sample(range(6, 80), 4), reverse=True)
    s = [
        f"{people[0]} lives in {towns[0]}, a town north of {towns[1]}.",
        f"{people[1]} is the {rng.choice(('sister', 'brother', 'cousin', 'friend'))} of "
        f"{people[0]} and works in {towns[1]}.",
        f"{people[0]} is {ages[0]} years old and {people[2]} is {ages[2]}, so {people[0]} is "
        f"older than {people[2]}.",
        f"{towns[2]} is the capital of {entity(rng)}, and {people[3]} was born there.",
        f"The road from {towns[0]} to {towns[2]} is {rng.randint(3, 90)} kilometres long.",
        f"{people[3]} is younger than {people[1]}, who is {ages[1]}.",
        f"Every {rng.choice(('spring', 'summer', 'winter'))}, {people[2]} visits {towns[1]}.",
    ]
    k = rng.randint(3, len(s))
    return " ".join(sorted(rng.sample(s, k), key=s.index))


def _num(n: int, rng: random.Random) -> str:
    return NUMBER_WORDS[n] if n < 10 and rng.random() < 0.5 else str(n)


def _counting(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    f1, f2 = rng.sample(FOODS, 2)
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    cmp = "more" if a > b else "fewer" if a < b else "as many"
    tail = "as" if a == b else "than"
    s = [
        f"{name} has {_num(a, rng)} {f1} and {_num(b, rng)} {f2}.",
        f"So {name} has {cmp} {f1} {tail} {f2}.",
        f"Together that makes {a + b} pieces of food.",
        f"If {name} eats {_num(min(a, 2), rng)} {f1}, {a - min(a, 2)} will be left.",
        f"{a} plus {b} is {a + b}, and {max(a, b)} minus {min(a, b)} is {abs(a - b)}.",
        f"Twice {a} is {2 * a}.",
    ]
    k = rng.randint(2, len(s))
    return " ".join(s[:k])


_CORNERS = {"square": 4, "circle": 0, "triangle": 3, "cross": 0, "ring": 4, "bar": 4}


def _world_facts(rng: random.Random) -> str:
    shape, shape2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.sample(COLOURS, 2)
    name = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    s = [
        f"A {shape} has {NUMBER_WORDS[_CORNERS[shape]]} corners, while a {shape2} has "
        f"{NUMBER_WORDS[_CORNERS[shape2]]}.",
        f"{name} painted a {c1} {shape} on the {thing} and a {c2} {shape2} next to it.",
        f"A large {shape} covers more of the page than a small one.",
        f"When {name} counted the shapes on the wall, there were {rng.randint(2, 9)} of them.",
        f"The {c1} one was above the {c2} one, and both were bigger than a coin.",
        f"Most people can tell a {shape} from a {shape2} at a glance.",
    ]
    k = rng.randint(2, len(s))
    return " ".join(sorted(rng.sample(s, k), key=s.index))


PROFESSIONS = _words(
    "baker farmer teacher doctor sailor painter carpenter gardener miner weaver potter "
    "fisher judge nurse pilot singer tailor guard merchant builder"
)
HABITATS = _words(
    "forests deserts rivers mountains meadows swamps islands caves reefs valleys "
    "grasslands hedges ponds cliffs"
)
ANIMAL_FACTS = _words(
    "badger beaver camel dolphin eagle falcon ferret gecko heron hedgehog jackal koala "
    "lizard lynx magpie moose otter panda parrot pelican penguin raccoon salmon seal "
    "squirrel swan tiger turtle walrus weasel whale wolf zebra"
)
DIETS = _words("insects seeds berries fish leaves grass roots worms fruit shellfish mice")
MONTHS = _words(
    "January February March April May June July August September October November December"
)
QUESTIONS = (
    "Where is my {thing}?",
    "Have you seen the {thing}?",
    "Can you help me carry the {thing}?",
    "Why is the {thing} so {adj}?",
)


def _animals(rng: random.Random) -> str:
    animals = rng.sample(ANIMAL_FACTS, 3)
    s = [
        f"The {a} lives in {rng.choice(HABITATS)} and mostly eats {rng.choice(DIETS)}."
        for a in animals
    ]
    s.append(
        f"A grown {animals[0]} can weigh about {rng.randint(2, 900)} kilograms, while a young "
        f"one weighs much less."
    )
    s.append(f"Unlike the {animals[1]}, the {animals[2]} is most active at night.")
    return " ".join(s[: rng.randint(2, len(s))])


def _dialogue(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    q = rng.choice(QUESTIONS).format(thing=thing, adj=rng.choice(ADJECTIVES))
    when = rng.choice(("lunch", "dinner", "school", "the rain"))
    return (
        f'"{q}" asked {a}. "I think it is in the {place}," said {b}, who was a '
        f'{rng.choice(PROFESSIONS)}. "Let us look together after {when}," '
        f"{a} replied. They found it on the {rng.randint(1, 28)}th of {rng.choice(MONTHS)}."
    )


def _history(rng: random.Random) -> str:
    town, person = entity(rng), rng.choice(NAMES)
    year = rng.randint(1200, 2020)
    job, later = rng.choice(PROFESSIONS), year + rng.randint(5, 120)
    return (
        f"In {year}, a {job} named {person} founded the town of {town}. By {later} "
        f"it had {rng.randint(2, 90) * 100} inhabitants. The old "
        f"{rng.choice(PLACES)} of {town} was built in {year + rng.randint(1, 300)} and still "
        f"stands today. Every {rng.choice(MONTHS)}, people from {entity(rng)} come to visit it."
    )


GENERAL_GENRES = {
    "story": _story,
    "relations": _relations,
    "counting": _counting,
    "world": _world_facts,
    "animals": _animals,
    "dialogue": _dialogue,
    "history": _history,
}


def general_document(rng: random.Random) -> str:
    """One in-distribution general-text document (a few sentences of one genre)."""
    return GENERAL_GENRES[rng.choice(tuple(GENERAL_GENRES))](rng)


# ------------------------------------------------------------------ out-of-distribution text

_WEATHER = ["sunny", "cloudy", "foggy", "rainy", "stormy", "windy", "snowy", "humid", "overcast"]
_DIRS = ["north", "south", "east", "west", "northeast", "southwest"]
_INGREDIENTS = _words("flour butter sugar milk yeast cinnamon vanilla honey oats cocoa")
_STEPS = _words("whisk knead simmer bake stir fold chill sprinkle drizzle grate")
_TEAMS = ["Riverton", "Ashford", "Millbrook", "Stonegate", "Oakridge", "Fairhaven", "Kingsbury"]


def _weather(rng: random.Random) -> str:
    city = rng.choice(_TEAMS)
    out = [f"Forecast for {city}:"]
    for part in ("morning", "afternoon", "night"):
        out.append(
            f"{part.capitalize()}: {rng.choice(_WEATHER)}, {rng.randint(-5, 34)} degrees, "
            f"wind from the {rng.choice(_DIRS)} at {rng.randint(2, 60)} km/h."
        )
    out.append(f"Chance of precipitation {rng.randint(0, 100)} percent.")
    return " ".join(out)


def _recipe(rng: random.Random) -> str:
    items = rng.sample(_INGREDIENTS, 4)
    out = [f"Recipe: {items[0]} and {items[1]} cake. Serves {rng.randint(2, 8)}."]
    for i, step in enumerate(rng.sample(_STEPS, rng.randint(3, 5)), start=1):
        out.append(f"Step {i}: {step} {rng.randint(50, 500)} g of {rng.choice(items)}.")
    out.append(f"Preheat the oven to {rng.choice((160, 180, 200, 220))} degrees beforehand.")
    return " ".join(out)


def _match(rng: random.Random) -> str:
    home, away = rng.sample(_TEAMS, 2)
    g1, g2 = rng.randint(0, 5), rng.randint(0, 5)
    return (
        f"Match report: {home} {g1}, {away} {g2}. The goalkeeper made {rng.randint(1, 9)} saves "
        f"before half-time. Attendance: {rng.randint(800, 40000)} spectators. The referee "
        f"showed {rng.randint(0, 6)} yellow cards. Next fixture: {away} against "
        f"{rng.choice(_TEAMS)} on {rng.choice(('Tuesday', 'Saturday'))}."
    )


def _letter(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    return (
        f"Dear {a}, thank you for your invoice dated {rng.randint(1, 28)} "
        f"{rng.choice(('March', 'June', 'October'))}. Unfortunately the parcel arrived damaged, "
        f"and we kindly request a refund of {rng.randint(10, 999)} euros. Please reply at your "
        f"earliest convenience. Yours sincerely, {b}."
    )


OOD_GENRES = {"weather": _weather, "recipe": _recipe, "match": _match, "letter": _letter}


def ood_document(rng: random.Random) -> str:
    """One out-of-distribution document (genres and templates never used in training)."""
    return OOD_GENRES[rng.choice(tuple(OOD_GENRES))](rng)
