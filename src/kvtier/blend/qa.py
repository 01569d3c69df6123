"""A seeded RAG question-answering set from real facts, for measuring blend quality offline.

The facts are the IANA time zone database's country and zone tables (``iso3166.tab``,
``zone1970.tab``; public domain, shipped with every Linux system and with Python's ``tzdata``):
which zone a country keeps time by, and its ISO code. Each *document* states the facts of a few
countries as sentences; each *question* asks about one country, and the document that answers it
is among the ``k`` documents of its prompt, at a random place, with the others as distractors.
Nothing is downloaded; the same seed gives the same set on every machine.

Why this set: answers are short spans copied from a document (``Europe/Paris``), so exact match
and token F1 against the gold answer mean something even for a 135M-parameter model, and the
prompt's documents recur in many orders and combinations, as RAG pools do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from kvtier.blend.plan import BlendError

TZ_DIRS = (Path("/usr/share/zoneinfo"),)


@dataclass(frozen=True, order=True)
class Country:
    code: str
    name: str
    zone: str


@dataclass(frozen=True)
class QAItem:
    documents: tuple[int, ...]  # indexes into the pool, in prompt order
    question: str
    answer: str


def _tz_dir() -> Path:
    dirs = list(TZ_DIRS)
    try:
        import tzdata  # type: ignore[import-not-found, unused-ignore]

        dirs.append(Path(tzdata.__file__).parent / "zoneinfo")
    except ImportError:
        pass
    for d in dirs:
        if (d / "iso3166.tab").is_file() and (d / "zone1970.tab").is_file():
            return d
    raise BlendError("no tz database tables (iso3166.tab, zone1970.tab): install tzdata")


def countries() -> list[Country]:
    """Countries with exactly one time zone in ``zone1970.tab`` (so the answer is unambiguous)."""
    d = _tz_dir()
    names: dict[str, str] = {}
    for line in (d / "iso3166.tab").read_text().splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")[:2]
            names[code] = name
    zones: dict[str, list[str]] = {}
    for line in (d / "zone1970.tab").read_text().splitlines():
        if line and not line.startswith("#"):
            codes, _, zone = line.split("\t")[:3]
            for c in codes.split(","):
                zones.setdefault(c, []).append(zone)
    return sorted(Country(c, names[c], z[0]) for c, z in zones.items() if len(z) == 1 and c in names)


def build(
    *, pool: int = 24, per_doc: int = 4, k: int = 6, questions: int = 60, seed: int = 0
) -> tuple[list[str], list[QAItem]]:
    """``pool`` documents of ``per_doc`` countries each, and ``questions`` items of ``k`` documents."""
    rng = random.Random(f"blend-qa:{seed}")
    cs = countries()
    rng.shuffle(cs)
    if len(cs) < pool * per_doc:
        raise BlendError(f"only {len(cs)} single-zone countries; lower pool or per_doc")
    docs: list[str] = []
    facts: list[list[Country]] = []
    for i in range(pool):
        group = cs[i * per_doc : (i + 1) * per_doc]
        lines = [f"{c.name} (country code {c.code}) keeps time by the zone {c.zone}." for c in group]
        docs.append(f"Passage {i + 1}: " + " ".join(lines) + "\n")
        facts.append(group)
    items: list[QAItem] = []
    for _ in range(questions):
        chosen = rng.sample(range(pool), k)
        c = rng.choice(facts[chosen[0]])
        rng.shuffle(chosen)
        items.append(QAItem(tuple(chosen), f"Which time zone does {c.name} keep time by?", c.zone))
    return docs, items
