"""Every relative link in README.md and docs/*.md names a file of the repository (the README used
to link ../shared/DESIGN.md, outside it), and every docs page is linked from the README."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve_inside_the_repository() -> None:
    bad = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() or ROOT not in path.parents:
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, bad
    assert "../shared" not in (ROOT / "README.md").read_text()


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not missing, missing
