"""BENCHMARKS.md stays a short reference that every pointer into it still finds.

The lab log behind it is benchmarks/HISTORY.md; these tests keep the reference small and check
the links (`BENCHMARKS.md#anchor`) and the section names quoted in prose and code
(`BENCHMARKS.md, "Flax NNX"`) that lead into it.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
MAX_BYTES = 25 * 1024
# Where readers and code point into BENCHMARKS.md (the lab log quotes the file of its day).
SOURCES = ["README.md", "BENCHMARKS.md", "benchmarks/*.py", "dpn_jax/**/*.py", "tests/*.py"]
SOURCES += ["dpn_jax/**/*.cc", "dpn_jax/**/*.h", "docs/**/*.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    return re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)


def sources() -> dict[str, str]:
    """Each source file's text with line breaks, comment markers and indentation folded into
    single spaces, so a reference wrapped over lines reads as one."""
    return {
        str(path.relative_to(ROOT)): re.sub(r"\s*\n\s*(?:#+ |// ?)?\s*", " ", path.read_text())
        for pattern in SOURCES
        for path in sorted(ROOT.glob(pattern))
        if path != Path(__file__).resolve()  # its docstrings quote examples
    }


def test_benchmarks_md_is_at_most_25_kb():
    size = BENCHMARKS.stat().st_size
    assert size <= MAX_BYTES, f"BENCHMARKS.md is {size} bytes: move history to HISTORY.md"


def test_links_into_benchmarks_md_resolve():
    anchors = {slug(h) for h in headings(BENCHMARKS.read_text())}
    links = [
        (name, anchor)
        for name, text in sources().items()
        for target, anchor in re.findall(r"\]\(((?:\.\./)*BENCHMARKS\.md)?#([\w\-]+)\)", text)
        if target or name == "BENCHMARKS.md"
    ]
    assert any(name == "README.md" for name, _ in links)  # README's link is among them
    assert [link for link in links if link[1] not in anchors] == []


def test_quoted_section_names_exist():
    """`BENCHMARKS.md, "Name"` and `BENCHMARKS.md ("Name"` name a heading (or a bold lead-in
    such as **why one process per engine**) of the current file."""
    text = BENCHMARKS.read_text()
    names = [h.lower() for h in headings(text)]
    names += [" ".join(b.lower().split()) for b in re.findall(r"\*\*([^*]+)\*\*", text)]
    quoted = [
        (name, section)
        for name, source in sources().items()
        for section in re.findall(r'BENCHMARKS\.md[,:]? \(?"([^"]+)"', source)
    ]
    assert len(quoted) >= 10  # the pattern still finds the references
    missing = [(n, s) for n, s in quoted if not any(s.lower() in h for h in names)]
    assert missing == []
