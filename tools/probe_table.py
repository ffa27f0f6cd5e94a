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


def bandwidth_table(path, what: str, columns: list[str], extra: str = ""):
    """(the streaming-read rate measured now, GB/s; the ProbeTable of a probe judged against it, titled
    `what (GPU name)`) for the probes whose rows report % of that rate."""
    import torch
    from bench_kernels import read_bandwidth

    device = torch.device("cuda")
    bw = read_bandwidth(device)
    return bw, ProbeTable(path, f"{what} ({torch.cuda.get_device_name(device)})",
                          f"date {utc_stamp()} · {extra}streaming read {bw:.0f} GB/s", columns)
