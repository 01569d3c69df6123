"""Documents to warm: text files (one document each), folders of them, and JSONL files.

Invariants:
* Order is deterministic (arguments in order, folder entries sorted), so a resumed run visits the
  same documents in the same order.
* A document's ``digest`` depends on its text only (sha256): the resume state of ``kvtier warm
  --url`` survives renamed files.
* Bad input is a ``WarmError`` naming the file (and line) and the fix, before anything is computed
  for that file; empty documents are skipped (nothing to cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from kvtier.errors import KVTierError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".json", ".jsonl")
"""Files a folder contributes (``.jsonl`` as records, the others as one document each)."""


class WarmError(KVTierError, ValueError):
    """A corpus, model or server that ``kvtier warm`` cannot use (one line: what and the fix)."""


@dataclass(frozen=True)
class Document:
    """One document: ``id`` names it in messages (``path`` or ``path:line`` or the record's id)."""

    id: str
    text: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_corpus(paths: Sequence[str | Path], *, text_field: str = "text") -> Iterator[Document]:
    """The documents of ``paths``; a ``.jsonl`` file gives one per line (its ``text_field``)."""
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not files:
                raise WarmError(
                    f"{p}: no {'/'.join(TEXT_SUFFIXES)} files in this folder — point at the documents"
                )
            for f in files:
                yield from _file(f, text_field)
        elif p.is_file():
            yield from _file(p, text_field)
        else:
            raise WarmError(f"{p}: no such file or folder — give text files, folders or .jsonl files")


def _file(path: Path, text_field: str) -> Iterator[Document]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WarmError(
            f"{path}: not UTF-8 text ({e.reason} at byte {e.start}) — convert it or leave it out"
        ) from e
    except OSError as e:
        raise WarmError(f"{path}: {e.strerror} — check the path and its permissions") from e
    if path.suffix != ".jsonl":
        if text.strip():
            yield Document(str(path), text)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise WarmError(f"{path}:{n}: not a JSON object ({e.msg}) — one JSON object per line") from e
        body = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(body, str):
            raise WarmError(
                f"{path}:{n}: no string field {text_field!r} — name the text field with --text-field"
            )
        if body.strip():
            rid = rec.get("id")
            yield Document(f"{path}:{n}" if rid is None else str(rid), body)
