"""Docs are the project's own: every reference to a docs page (and to a section of it) points at
something that exists, and no text points at a design document other than docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCES = sorted(
    [*ROOT.glob("tensorattn/**/*.py"), *DOCS.glob("*.md"), ROOT / "README.md", *ROOT.glob("benchmarks/*.py"),
     ROOT / "benchmarks" / "README.md", *ROOT.glob("examples/*.py")]
)
#: a page reference like docs/design.md#the-certificate, design.md#numerics or (torch.md)
REFERENCE = re.compile(r"(?:docs/)?\b([a-z][a-z0-9_-]*\.md)(?:#([a-z0-9-]+))?")


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # headings only outside code
    return {slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def references() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in SOURCES:
        for m in REFERENCE.finditer(path.read_text()):
            page, anchor = m.group(1), m.group(2)
            if page in ("README.md",) or (DOCS / page).exists() or page.startswith("design"):
                if page != "README.md":
                    found.append((path, page, anchor))
    return found


def test_slug_follows_github():
    assert slug("The bound check") == "the-bound-check"
    assert slug("From a call to a result") == "from-a-call-to-a-result"
    assert slug("Request and `Problem`") == "request-and-problem"


def test_design_page_has_the_sections_the_code_cites():
    refs = [r for r in references() if r[1] == "design.md"]
    assert len(refs) >= 10, "the package cites docs/design.md sections"
    have = anchors(DOCS / "design.md")
    missing = [(str(p.relative_to(ROOT)), a) for p, _, a in refs if a is not None and a not in have]
    assert not missing, f"references to sections docs/design.md does not have: {missing}; it has {sorted(have)}"


@pytest.mark.parametrize("page", sorted({r[1] for r in references()}))
def test_every_docs_reference_resolves(page):
    assert (DOCS / page).exists(), f"docs/{page} is referenced but does not exist"
    have = anchors(DOCS / page)
    bad = [(str(p.relative_to(ROOT)), a) for p, pg, a in references() if pg == page and a and a not in have]
    assert not bad, f"anchors missing from docs/{page}: {bad}"


def test_no_reference_to_another_design_document():
    offenders = [str(p.relative_to(ROOT)) for p in SOURCES if re.search(r"\bDESIGN\b", p.read_text())]
    assert not offenders, f"these files cite a design document other than docs/design.md: {offenders}"
