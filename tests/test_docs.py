"""docs/method.md section 0 names the functions of one S-DPO step and the files that define them:
every name must be defined in one of its row's files, so the trail cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[tuple[list[str], list[str]]]:
    text = (ROOT / "docs" / "method.md").read_text()
    section = text[text.index("## 0."):text.index("## Layout")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            rows.append((re.findall(r"`([^`]+)`", cells[1]), [f.strip() for f in cells[2].split(",")]))
    return rows


def _defined(name: str, source: str, python: bool) -> bool:
    if python:
        if "." in name:     # Class.method: the class, and the method defined after it
            cls, method = name.split(".")
            start = source.find(f"class {cls}")
            return start >= 0 and re.search(rf"\n    def {re.escape(method)}\(", source[start:]) is not None
        return re.search(rf"^(def|class) {re.escape(name)}\b", source, re.M) is not None
    # C++: a definition is the name followed by its parameter list, after a return type
    return re.search(rf"[\w>&*]\s+{re.escape(name)}(<[^>]*>)?\(", source) is not None


def test_every_function_of_the_trail_is_where_it_says():
    rows = _rows()
    assert len(rows) >= 15
    for names, files in rows:
        assert names and files
        sources = [(ROOT / f).read_text() for f in files]
        for name in names:
            assert any(_defined(name, src, f.endswith(".py")) for src, f in zip(sources, files)), (name, files)
