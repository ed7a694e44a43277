"""Deterministic synthetic children's stories: the offline quickstart corpus.

`generate_stories(n, seed)` yields `n` short stories built from a small grammar: a main
character (name, kind, trait, pronouns, family, home), a friend, an object, a place, and one of
several plots with a simple causal chain (a want, a problem, a reaction with dialogue, a
resolution that follows from it, and a closing lesson). Story `i` depends only on `(seed, i)`, so
any prefix of the corpus is the same whatever `n` is, and generation needs no network and no
files. The default 5,000 stories (~2.9 MB) take a fraction of a second to make.

The vocabulary is small and the structure repetitive on purpose: a model of a few hundred
thousand parameters learns names, pronoun agreement, dialogue punctuation and plot order from it
within minutes on a CPU, which is what a quickstart needs to show.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

GENERATOR_VERSION = 1  # bump when the output changes, so cached prepared datasets are rebuilt
DEFAULT_STORIES = 5000
DEFAULT_SEED = 0

_NAMES = {
    "she": [
        "Lily",
        "Mia",
        "Anna",
        "Zoe",
        "Emma",
        "Lucy",
        "Sara",
        "Rosa",
        "Ella",
        "Nora",
        "Ruby",
        "Maya",
    ],
    "he": ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Tim", "Finn", "Omar", "Noah", "Eli", "Hugo"],
}
_KINDS = [
    "girl",
    "boy",
    "bunny",
    "puppy",
    "kitten",
    "bear",
    "fox",
    "duck",
    "mouse",
    "owl",
    "frog",
    "pig",
]
_TRAITS = [
    "little",
    "curious",
    "brave",
    "shy",
    "kind",
    "happy",
    "clever",
    "silly",
    "careful",
    "cheerful",
]
_HOMES = [
    "in a small house near the woods",
    "in a busy town with a big clock",
    "on a farm with a red barn",
    "in a cozy village by the sea",
    "in a tall tree in the forest",
    "in a yellow house on a hill",
]
_FAMILY = ["mom", "dad", "grandma", "grandpa", "big sister", "big brother"]
_PLACES = [
    "the park",
    "the garden",
    "the river",
    "the beach",
    "the hill",
    "the market",
    "the meadow",
    "the pond",
]
_OBJECTS = [
    ("ball", "red"),
    ("kite", "blue"),
    ("stone", "shiny"),
    ("boat", "small"),
    ("teddy bear", "soft"),
    ("hat", "yellow"),
    ("drum", "loud"),
    ("book", "old"),
    ("bucket", "green"),
    ("scarf", "warm"),
]
_HIDING = [
    ("under a big leaf", "the wind had blown it there"),
    ("behind the old tree", "it had rolled down the path"),
    ("in a bush full of berries", "a bird had carried it away"),
    ("next to a sleeping cat", "the cat liked to play with it"),
    ("inside a hollow log", "a squirrel had hidden it there"),
]
_FEARS = [
    ("the dark", "turned on a little lamp", "the shapes on the wall were only toys"),
    ("thunder", "counted slowly after each flash", "the storm was far away and moving on"),
    ("the big dog next door", "held out a hand very slowly", "the dog only wanted to play"),
    ("deep water", "held on to a float", "the water was warm and fun"),
    ("the tall slide", "went up one step at a time", "sliding down felt like flying"),
]
_ACTIVITIES = ["have a picnic", "fly a kite", "play ball", "look for shells", "pick flowers"]
_INDOOR = [
    "build a fort of pillows",
    "paint a picture",
    "bake cookies",
    "read a story",
    "play a game of cards",
]
_HELP = [
    ("a bird with a hurt wing", "made a soft bed of grass for it", "flew again"),
    ("a kitten stuck in a tree", "ran to get a ladder", "jumped down safely"),
    ("a baby duck that lost its mother", "walked with it along the river", "found its family"),
    ("a turtle on its back", "gently turned it over", "walked away slowly"),
]
_BAKES = [
    ("a cake", "salt instead of sugar", "it tasted terrible"),
    ("bread", "no yeast", "it was flat as a plate"),
]
_FEELINGS_BAD = ["sad", "upset", "worried", "grumpy"]
_FEELINGS_GOOD = ["happy", "proud", "glad", "excited"]


@dataclass
class _Hero:
    name: str
    kind: str
    trait: str
    he: str  # "she" / "he"
    fam: str  # who the character lives with, named again when the plot needs a grown-up

    @property
    def intro(self) -> str:
        """How the story names this character the first time it meets them."""
        if self.kind in ("girl", "boy"):
            return f"{self.name}, a {self.kind} from next door,"
        return f"{self.name} the {self.kind}"

    @property
    def him(self) -> str:
        return "her" if self.he == "she" else "him"

    @property
    def his(self) -> str:
        return "her" if self.he == "she" else "his"

    @property
    def He(self) -> str:
        return self.he.capitalize()

    @property
    def His(self) -> str:
        return self.his.capitalize()


def _hero(rng: random.Random, avoid: str = "") -> _Hero:
    he = rng.choice(("she", "he"))
    name = rng.choice([n for n in _NAMES[he] if n != avoid])
    kind = rng.choice(_KINDS)
    if kind == "girl" and he == "he":
        kind = "boy"
    elif kind == "boy" and he == "she":
        kind = "girl"
    return _Hero(name, kind, rng.choice(_TRAITS), he, rng.choice(_FAMILY))


def _plot_lost(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    obj, adj = rng.choice(_OBJECTS)
    where, why = rng.choice(_HIDING)
    return [
        f"{h.name} had a {adj} {obj}. {h.He} took it everywhere.",
        f"One day, {h.name} went to {place} to play with {h.his} {obj}.",
        f"But when it was time to go home, the {obj} was gone! {h.name} felt {rng.choice(_FEELINGS_BAD)}.",
        f'"Where is my {obj}?" {h.name} cried.',
        f'{h.his.capitalize()} friend {f.intro} came by. "I will help you look," said {f.name}.',
        f"They looked everywhere. At last they found the {obj} {where}, because {why}.",
        f'"Thank you, {f.name}!" said {h.name}. {h.He} gave {f.name} a big hug.',
        "From that day on, they always played together, and the "
        f"{obj} never got lost again, because {h.name} kept it close.",
    ]


def _plot_share(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    obj, adj = rng.choice(_OBJECTS)
    return [
        f"{h.name} got a new {adj} {obj} and took it to {place}.",
        f'{f.intro} saw it and asked, "Can I play with your {obj} too?"',
        f'"No, it is mine," said {h.name}. {f.name} walked away and felt {rng.choice(_FEELINGS_BAD)}.',
        f"Soon {h.name} was bored, because playing alone was not much fun.",
        f'{h.He} ran after {f.name} and said, "I am sorry. Let\'s play together."',
        f"{f.name} smiled. They took turns with the {obj} until the sun went down.",
        f"{h.name} learned that sharing makes a game twice as much fun.",
    ]


def _plot_fear(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    fear, trick, truth = rng.choice(_FEARS)
    fam = h.fam
    return [
        f"{h.name} was afraid of {fear}.",
        f'One evening {h.name} told {h.his} {fam}, "I do not like {fear}. It makes me shake."',
        f'{h.His} {fam} said, "Being brave does not mean you are not scared. Let\'s try together."',
        f"So {h.name} {trick}. {h.He} took a deep breath.",
        f"Then {h.name} saw that {truth}.",
        f'"That was not so bad!" said {h.name}. {h.He} felt {rng.choice(_FEELINGS_GOOD)}.',
        f"The next day {h.name} told {f.name} all about it, and {f.name} said {h.he} was very brave.",
    ]


def _plot_rain(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    act = rng.choice(_ACTIVITIES)
    indoor = rng.choice(_INDOOR)
    fam = h.fam
    return [
        f"{h.name} and {f.name} wanted to go to {place} to {act}.",
        "But dark clouds came, and it started to rain. Big drops hit the window.",
        f'"Now we cannot {act}," said {h.name}. {h.He} felt {rng.choice(_FEELINGS_BAD)}.',
        f'{h.His} {fam} said, "Why don\'t you {indoor} instead?"',
        f"So they decided to {indoor}. It was so much fun that they forgot about the rain.",
        f"When the rain stopped, they saw a big rainbow over {place}.",
        f'"Tomorrow we can {act}," said {f.name}, and they both laughed.',
    ]


def _plot_help(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    who, action, outcome = rng.choice(_HELP)
    return [
        f"One sunny morning, {h.name} walked to {place}.",
        f"There {h.he} saw {who}. It looked scared and alone.",
        f'"Don\'t worry, I will help you," said {h.name}.',
        f"{h.name} {action}. It took a long time, but {h.he} did not give up.",
        f"At last the little animal {outcome}. {h.name} felt {rng.choice(_FEELINGS_GOOD)}.",
        f'When {h.he} told {f.intro} {f.name} said, "You have a kind heart, {h.name}."',
        "Helping others made the whole day feel bright.",
    ]


def _plot_bake(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    food, mistake, result = rng.choice(_BAKES)
    fam = h.fam
    return [
        f"{h.name} wanted to make {food} with {h.his} {fam}.",
        f"They mixed and stirred, but {h.name} used {mistake}, so {result}.",
        f'"Oh no!" said {h.name}. "I made a mistake."',
        f'{h.His} {fam} smiled. "Everyone makes mistakes. We can try again."',
        f"So they tried again, and this time {h.name} was careful. The {food.split()[-1]} was perfect.",
        f"They shared it with {f.name} at {place}, and everyone said it was the best they ever had.",
    ]


def _plot_race(rng: random.Random, h: _Hero, f: _Hero, place: str) -> list[str]:
    return [
        f'At {place}, {f.name} said, "Let\'s race to the big tree!"',
        f"{h.name} and {f.name} ran as fast as they could. {h.name} was in front.",
        f"Then {f.name} tripped on a rock and fell down. {f.He} hurt {f.his} knee.",
        f"{h.name} could win the race, but {h.he} stopped and ran back to help {f.him}.",
        f'"Are you okay?" asked {h.name}. "Lean on me."',
        "They walked to the big tree together, and they both touched it at the same time.",
        f'"We both won," said {f.name}. Being a good friend is better than winning.',
    ]


_PLOTS = [_plot_lost, _plot_share, _plot_fear, _plot_rain, _plot_help, _plot_bake, _plot_race]


def story(seed: int, index: int) -> str:
    """The story number `index` of the corpus with `seed` (a pure function of both)."""
    rng = random.Random(seed * 1_000_003 + index)
    h = _hero(rng)
    f = _hero(rng, avoid=h.name)
    place = rng.choice(_PLACES)
    opening = rng.choice(("Once upon a time", "One day", "Long ago", "Once"))
    lines = [
        f"{opening}, there was a {h.trait} {h.kind} named {h.name}. "
        f"{h.He} lived {rng.choice(_HOMES)} with {h.his} {h.fam}."
    ]
    lines += rng.choice(_PLOTS)(rng, h, f, place)
    lines.append("The end." if rng.random() < 0.3 else f"And {h.name} smiled all the way home.")
    return " ".join(lines)


def generate_stories(n: int = DEFAULT_STORIES, seed: int = DEFAULT_SEED) -> Iterator[str]:
    """Yield `n` stories, deterministic in `seed`; story `i` is `story(seed, i)`."""
    for i in range(n):
        yield story(seed, i)
