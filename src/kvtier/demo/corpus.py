"""Deterministic English-like text for demo prompts: no download, no bundled data files.

Sentences are assembled from small word lists with a seeded ``random.Random``, so every run
(and both halves of a with/without comparison) sees exactly the same text.
"""

from __future__ import annotations

import random

_ADJ = (
    "quiet",
    "northern",
    "ancient",
    "busy",
    "narrow",
    "bright",
    "careful",
    "distant",
    "patient",
    "rusty",
    "modern",
    "small",
    "crowded",
    "empty",
    "green",
    "frozen",
    "wooden",
    "famous",
    "hidden",
    "gentle",
)
_NOUN = (
    "engineer",
    "librarian",
    "farmer",
    "pilot",
    "council",
    "teacher",
    "merchant",
    "doctor",
    "painter",
    "captain",
    "student",
    "baker",
    "surveyor",
    "committee",
    "gardener",
    "mayor",
    "chemist",
    "sailor",
)
_THING = (
    "bridge",
    "harbour",
    "archive",
    "orchard",
    "railway",
    "market",
    "lighthouse",
    "reservoir",
    "school",
    "workshop",
    "observatory",
    "granary",
    "canal",
    "museum",
    "mill",
    "tunnel",
    "garden",
    "clock tower",
)
_VERB = (
    "repaired",
    "measured",
    "described",
    "inspected",
    "painted",
    "recorded",
    "rebuilt",
    "visited",
    "mapped",
    "cleaned",
    "studied",
    "protected",
    "moved",
    "opened",
    "examined",
    "restored",
)
_PLACE = (
    "the valley",
    "the old town",
    "the coast",
    "the river delta",
    "the mountain pass",
    "the island",
    "the eastern district",
    "the harbour front",
    "the plateau",
    "the forest edge",
)
_TIME = (
    "in the spring",
    "after the storm",
    "before dawn",
    "during the festival",
    "in 1887",
    "last winter",
    "every Tuesday",
    "at the end of the season",
    "for three weeks",
    "in the dry years",
)
_REASON = (
    "because the old records were wrong",
    "so that trade could continue",
    "to please the visitors",
    "after a long debate",
    "without asking anyone",
    "despite the cost",
    "as the law required",
    "to settle an old dispute",
)


def sentence(rng: random.Random) -> str:
    """One sentence, e.g. "The careful surveyor mapped the canal near the coast after the storm."."""
    form = rng.randrange(4)
    a, n, t, v, p = (
        rng.choice(_ADJ),
        rng.choice(_NOUN),
        rng.choice(_THING),
        rng.choice(_VERB),
        rng.choice(_PLACE),
    )
    if form == 0:
        return f"The {a} {n} {v} the {t} near {p} {rng.choice(_TIME)}."
    if form == 1:
        return f"{rng.choice(_TIME).capitalize()}, a {a} {n} {v} the {t} {rng.choice(_REASON)}."
    if form == 2:
        return f"The {t} in {p} was {v} by the {n}, {rng.choice(_REASON)}."
    return f"Nobody in {p} remembers why the {a} {t} was {v} {rng.choice(_TIME)}."


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def question(rng: random.Random) -> str:
    n, t, p = rng.choice(_NOUN), rng.choice(_THING), rng.choice(_PLACE)
    return rng.choice(
        (
            f"Who {rng.choice(_VERB)} the {t} near {p}, and why?",
            f"What does the text say about the {n}?",
            f"When was the {t} {rng.choice(_VERB)}?",
            f"Summarise what happened in {p} in one sentence.",
            f"Which places does the {n} visit?",
        )
    )
