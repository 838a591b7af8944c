"""The README and docs/ are a contract a reader can follow inside this repository.

- every relative link or image resolves to a file of the repository, and an anchor into a
  Markdown file names one of its headings (GitHub's slug rule);
- nothing points at notes that are not in the repository;
- the variables table comes early: its heading starts in the first half of the README.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]

# Inline links and images: [text](target) / ![alt](target "title"); the text may hold
# one level of brackets (an image inside a link).
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# Reference definitions: [label]: target
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
EXTERNAL = re.compile(r"^(?:https?:|mailto:)", re.I)


def _strip_fences(text: str) -> str:
    """Fenced code blocks hold neither links nor headings."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def _strip_code(text: str) -> str:
    """Fenced blocks and inline code spans are not links."""
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", _strip_fences(text), flags=re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation other than
    '-' and '_' removed, each space turned into '-'."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _strip_fences(page.read_text()), re.M):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = _strip_code(page.read_text())
    return [m.group(1) for m in INLINE.finditer(text)] + [
        m.group(1) for m in REFERENCE.finditer(text)
    ]


def test_there_are_pages_and_links() -> None:
    assert DOCS, "docs/ holds no Markdown page"
    assert sum(len(links(p)) for p in PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    problems = []
    for target in links(page):
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not dest.is_relative_to(REPO):
            problems.append(f"{target}: outside the repository")
            continue
        if not dest.exists():
            problems.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
            problems.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(REPO)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_reference_to_notes_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    for name in ("FACTS.md", "shared/seed", "../shared"):
        assert name not in text, f"{page.relative_to(REPO)} mentions {name}"


def test_no_tracked_file_points_at_notes_outside_the_repository() -> None:
    """Code comments, fixtures' provenance and deployed files included."""
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this = Path(__file__).resolve().relative_to(REPO).as_posix()
    found = []
    for name in tracked:
        path = REPO / name
        if name == this or not path.is_file():
            continue
        text = path.read_text(errors="replace")
        found += [f"{name}: {n}" for n in ("FACTS.md", "shared/seed", "../shared") if n in text]
    assert not found, "\n".join(found)


def test_the_variables_table_starts_in_the_first_half_of_the_readme() -> None:
    text = README.read_text()
    at = text.find("\n## Variables\n")
    assert at >= 0, "README.md has no '## Variables' heading"
    assert at + 1 < len(text) / 2, f"'## Variables' starts at {at + 1} of {len(text)} characters"


def test_the_slug_rule() -> None:
    assert slug("Pinned versions, and how to move them") == "pinned-versions-and-how-to-move-them"
    assert slug("Where the guide is wrong on current llama.cpp") == (
        "where-the-guide-is-wrong-on-current-llamacpp"
    )
    assert slug("Per-conversation context: why the profiles use `-c 65536`") == (
        "per-conversation-context-why-the-profiles-use--c-65536"
    )
