"""A synthetic knowledge base: invented people with fixed attributes, stated in varied phrasings.

Why: the rest of the world's text is learnt to its floor by small models early in a run, so
architectures cannot differ on it. Facts are different: each (person, attribute) value is an
arbitrary association that only parameters can store, and language models store about 2 bits
of knowledge per parameter given enough exposures (Allen-Zhu & Li 2024, "Physics of Language
Models 3.3"). The number of people N is therefore a dial for capacity pressure on text.

What:
- `ATTRIBUTES`: up to eight attributes in a fixed order (birth year, home town, occupation,
  favourite colour, pet, employer, college, instrument), each with a finite set of values,
  six training phrasings and two phrasings reserved for evaluation (never in training
  documents, never in the tokenizer corpus). A held-out phrasing is a new sentence that still
  carries the attribute's cue word of the training phrasings ("born", "hometown", "pet",
  "employer", "instrument", ...): without such a cue a small model cannot tell which attribute
  a new sentence asks for, and the held-out loss then measures rephrasing, not knowledge.
- `knowledge_base(entities, attributes)`: the first `entities` people of one fixed world, a
  pure function of its two arguments (never of a data seed), so every run and every data seed
  sees the same facts. Bases are nested: person i and their values do not depend on N or on
  the number of attributes, so a larger base only adds people (and a longer one only adds
  attributes).
- `KnowledgeBase.biography(rng, phrasing)`: one document about a person drawn uniformly
  from the base, one sentence per attribute in shuffled order; the first sentence names the
  person in full, later ones by full or first name. Returned as pieces `(text, is_value)` so
  the evaluation can put its loss on the attribute values only.
- `KnowledgeBase.bits`: the information content Σ over people and attributes of
  log2 |values| (values are drawn uniformly and independently, so this is the entropy of the
  facts; names are not counted).

Which text documents are biographies is decided by index (`is_biography`): exactly a `share`
of any prefix of the text documents, the same positions for every data seed; the person and
the phrasing of a biography follow the document's generator, i.e. the data seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

from moesaic.config import KnowledgeConfig

WORLD_SEED = 0x6B6E6F77  # fixes the people of every knowledge base
PHRASINGS = ("train", "eval")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# ------------------------------------------------------------------ names

# Syllables chosen so that no name equals a word of the general or out-of-distribution text.
_FIRST_HEADS = _words("Al Bel Cor Dar El Fal Gor Hal Is Jor Kel Lys Mal Nyr Or Per Quen Ral Sel")
_FIRST_HEADS += _words("Tor Ul Vel Wen Yor")
_FIRST_TAILS = _words("a o ia en is an wyn ric mund da bert vin ette ina os ander elle ius ika ov")
_SUR_HEADS = _words(
    "Bram Birch Cald Drum Eld Fern Gild Hark Ivor Jass Kend Lusk Mord Nest Orm Pell Quill Rusk "
    "Stav Thorn Umb Vask Wend Yarr Zell Brack Crisp Dunn Frost Grell"
)
_SUR_TAILS = _words(
    "ford by croft well mere gate ley thorpe wood stone field ridge brook hurst shaw combe wold "
    "marsh ham low den fold cott bourne"
)


def _name(rng: random.Random) -> tuple[str, str]:
    """(first name, surname), e.g. ('Talvo', 'Kendmere')."""
    first = rng.choice(_FIRST_HEADS) + rng.choice(_FIRST_TAILS)
    return first, rng.choice(_SUR_HEADS) + rng.choice(_SUR_TAILS)


# ------------------------------------------------------------------ attributes and phrasings


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One attribute: its values and its phrasings (slots `{name}` and `{value}`; the name
    always comes before the value, which follows a space, so a value is one piece of text)."""

    name: str
    values: tuple[str, ...]
    train_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]

    def templates(self, phrasing: str) -> tuple[str, ...]:
        return self.train_templates if phrasing == "train" else self.eval_templates


def _towns() -> tuple[str, ...]:
    heads = _words("Bran Col Dun Hav Lin Mar Tre Wes")
    tails = _words("holt mouth stead port haven bridge minster cester")
    return tuple(h + t for h in heads for t in tails)


def _employers() -> tuple[str, ...]:
    owners = _words("Norvel Tasker Quimby Halden Orrin Pexley Vantor Creswell Dobbin Larkin")
    owners += _words("Merrow Solvey")
    return tuple(f"{o} {kind}" for o in owners for kind in ("Mills", "Works", "Company", "Foundry"))


def _colleges() -> tuple[str, ...]:
    names = _words(
        "Aldermoor Brightwater Coldharbour Dunmere Elmhollow Farrowdale Greystead Hollowmere "
        "Ironbrook Juniper Kestrel Lanthorn Marrowgate Northwold Oxcombe Pendle"
    )
    return tuple(f"{n} {kind}" for n in names for kind in ("College", "Academy"))


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "birth_year",
        tuple(str(y) for y in range(1900, 2000)),
        (
            "{name} was born in {value}.",
            "{name} came into the world in {value}.",
            "{name}'s year of birth is {value}.",
            "{name} was born back in {value}.",
            "Records show that {name} was born in {value}.",
            "{name} first saw daylight in {value}.",
        ),
        (
            "{name}'s birth took place in {value}.",
            "The year {name} was born was {value}.",
        ),
    ),
    Attribute(
        "home_town",
        _towns(),
        (
            "{name} grew up in {value}.",
            "{name} spent a childhood in {value}.",
            "{name} calls {value} home.",
            "{name} comes from the town of {value}.",
            "The hometown of {name} is {value}.",
            "{name} was raised in {value}.",
        ),
        (
            "{name}'s hometown is {value}.",
            "As a child, {name} lived in {value}.",
        ),
    ),
    Attribute(
        "occupation",
        _words(
            "baker farmer teacher doctor sailor painter carpenter gardener miner weaver potter "
            "fisher judge nurse pilot singer tailor guard merchant builder banker cook dentist "
            "drummer glassblower hatter jeweller locksmith mason printer saddler watchmaker"
        ),
        (
            "{name} works as a {value}.",
            "{name} earns a living as a {value}.",
            "By trade, {name} is a {value}.",
            "{name} has a job as a {value}.",
            "{name} trained to be a {value}.",
            "Everyone knows {name} as a hard-working {value}.",
        ),
        (
            "{name} is working as a {value}.",
            "{name}'s job is being a {value}.",
        ),
    ),
    Attribute(
        "colour",
        _words(
            "red green blue yellow purple orange cyan pink white brown grey black violet teal "
            "crimson amber"
        ),
        (
            "{name}'s favourite colour is {value}.",
            "{name} likes the colour {value} best.",
            "{name} loves everything that is {value}.",
            "Of all colours, {name} prefers {value}.",
            "{name} would always pick {value} over any other colour.",
            "The colour {name} likes most is {value}.",
        ),
        (
            "{name} is fondest of the colour {value}.",
            "{name}'s colour of choice is {value}.",
        ),
    ),
    Attribute(
        "pet",
        _words(
            "cat dog horse goat fox rabbit duck mouse sheep crow frog parrot tortoise hamster "
            "ferret canary lizard pony pig goose hedgehog snake toad badger"
        ),
        (
            "{name} keeps a {value} as a pet.",
            "{name} owns a pet {value}.",
            "At home, {name} looks after a {value}.",
            "{name} has a {value} for a pet.",
            "The pet of {name} is a {value}.",
            "{name} feeds a {value} every day.",
        ),
        (
            "{name}'s pet is a {value}.",
            "{name} takes care of a pet {value}.",
        ),
    ),
    Attribute(
        "employer",
        _employers(),
        (
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "{name} draws a salary from {value}.",
            "{name} has worked at {value} for years.",
            "The employer of {name} is {value}.",
            "{name} spends every weekday at {value}.",
        ),
        (
            "{name}'s employer is {value}.",
            "{name} is working for {value}.",
        ),
    ),
    Attribute(
        "college",
        _colleges(),
        (
            "{name} studied at {value}.",
            "{name} graduated from {value}.",
            "{name} went to {value} as a student.",
            "{name} earned a degree at {value}.",
            "The alma mater of {name} is {value}.",
            "{name} attended lectures at {value}.",
        ),
        (
            "{name} was a student at {value}.",
            "{name}'s degree is from {value}.",
        ),
    ),
    Attribute(
        "instrument",
        _words(
            "piano violin cello flute harp drum trumpet guitar oboe clarinet banjo lute organ "
            "fiddle horn accordion"
        ),
        (
            "{name} plays the {value}.",
            "{name} practises the {value} every evening.",
            "{name} learned to play the {value}.",
            "In the band, {name} is on the {value}.",
            "{name} is a gifted player of the {value}.",
            "The instrument of {name} is the {value}.",
        ),
        (
            "{name}'s instrument is the {value}.",
            "{name} likes to play the {value}.",
        ),
    ),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)


def bits_per_entity(attributes: int) -> float:
    """Information content of one person's facts: Σ log2 |values| over the first attributes."""
    return sum(math.log2(len(a.values)) for a in ATTRIBUTES[:attributes])


# ------------------------------------------------------------------ people and documents


@dataclasses.dataclass(frozen=True)
class Entity:
    """One person: names and one value index per attribute (all of `ATTRIBUTES`)."""

    first: str
    surname: str
    values: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"{self.first} {self.surname}"

    def value(self, attribute: int) -> str:
        return ATTRIBUTES[attribute].values[self.values[attribute]]


def random_entity(rng: random.Random) -> Entity:
    """A person with a random name and random values (not part of any knowledge base)."""
    first, surname = _name(rng)
    return Entity(first, surname, tuple(rng.randrange(len(a.values)) for a in ATTRIBUTES))


Pieces = tuple[tuple[str, bool], ...]


def biography(entity: Entity, attributes: int, rng: random.Random, phrasing: str) -> Pieces:
    """One sentence per attribute (shuffled), as pieces (text, is_value); "".join(text) is the
    document. Adjacent context pieces are merged; each value piece starts with its space."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing={phrasing!r} is not one of {PHRASINGS}")
    order = list(range(attributes))
    rng.shuffle(order)
    pieces: list[tuple[str, bool]] = []
    context = ""
    for i, a in enumerate(order):
        template = rng.choice(ATTRIBUTES[a].templates(phrasing))
        name = entity.name if i == 0 or rng.random() < 0.5 else entity.first
        before, after = template.split(" {value}")
        context += ("" if i == 0 else " ") + before.format(name=name)
        pieces += [(context, False), (" " + entity.value(a), True)]
        context = after.format(name=name)
    pieces.append((context, False))
    return tuple(pieces)


def is_biography(index: int, share: float) -> bool:
    """Whether text document `index` is a biography: exactly ⌊n·share⌋ of the first n are."""
    return math.floor((index + 1) * share) > math.floor(index * share)


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
    """The first `len(entities)` people of the world, with their first `attributes` facts."""

    entities: tuple[Entity, ...]
    attributes: int

    @property
    def bits(self) -> float:
        """Information content of the base in bits (module doc)."""
        return len(self.entities) * bits_per_entity(self.attributes)

    def biography(self, rng: random.Random, phrasing: str = "train") -> Pieces:
        """A biography of a uniformly drawn person (see `biography`)."""
        entity = self.entities[rng.randrange(len(self.entities))]
        return biography(entity, self.attributes, rng, phrasing)

    def document(self, rng: random.Random) -> str:
        """A training document: a biography in training phrasing, as plain text."""
        return "".join(text for text, _ in self.biography(rng, "train"))


@functools.lru_cache(maxsize=4)
def knowledge_base(entities: int, attributes: int) -> KnowledgeBase:
    """The knowledge base of the first `entities` people (pure function; see module doc)."""
    KnowledgeConfig(entities, attributes).validate()
    rng = random.Random(WORLD_SEED)  # one stream: a base is a prefix of every larger one
    seen: set[tuple[str, str]] = set()
    people = []
    while len(people) < entities:
        name = _name(rng)
        if name in seen:
            continue
        seen.add(name)
        people.append(Entity(*name, tuple(rng.randrange(len(a.values)) for a in ATTRIBUTES)))
    return KnowledgeBase(tuple(people), attributes)
