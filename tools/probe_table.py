"""The markdown table every GPU probe writes (tools/probe_*.py): a title, one line saying where and when
(and what reference rate), then one row per measurement. Each row is printed as it arrives and the whole
file rewritten, so a run cut short by a timeout keeps what it measured."""
from __future__ import annotations

import datetime as dt
from pathlib import Path


def utc_stamp() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}"


def gb_s(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


class ProbeTable:
    """`t = ProbeTable(path, title, run_line, columns)`; `t.add(cell, ...)` appends, prints and rewrites."""

    def __init__(self, path, title: str, run_line: str, columns: list[str]):
        self.path = Path(path)
        self.lines = [f"# {title}", "", run_line, "", "| " + " | ".join(columns) + " |",
                      "|" + "---|" * len(columns)]
        self.write()

    def add(self, *cells) -> None:
        self.lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        print(self.lines[-1], flush=True)
        self.write()

    def write(self) -> None:
        self.path.write_text("\n".join(self.lines) + "\n")
