"""Writing a benchmark's section into BENCHMARKS.md, leaving the other sections as they are."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace the ``## `` section of ``path`` that ``text`` starts with (its heading line), or append it."""
    heading = text.split("\n", 1)[0]
    if not heading.startswith("## "):
        raise ValueError(f"`text` should start with a '## ' heading, got {heading!r}.")
    current = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = text.rstrip("\n") + "\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(current):
        updated = pattern.sub(lambda _: section, current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + section
    path.write_text(updated.rstrip("\n") + "\n", encoding="utf-8")
