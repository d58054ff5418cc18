"""The README and docs/ link to each other's sections and figures: every relative link resolves."""
from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def prose(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks (a `# comment` there is not a heading)."""
    lines, fenced = [], False
    for line in path.read_text().split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


@cache
def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = (re.match(r"#+ (.*)", line) for line in prose(path))
    return {re.sub(r"[^\w\- ]", "", h.group(1).strip().lower()).replace(" ", "-") for h in headings if h}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for line in prose(page):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


def test_anchors_follow_githubs_rule():
    assert anchors(ROOT / "README.md") >= {"fusing-loras-and-searching-the-fusion-weights", "why-min_sigma",
                                           "errors-and-recovery"}
