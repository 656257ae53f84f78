"""Memory readings for the benchmarks: this process's peak resident set, and where in the code it rose.

``peak_rss``: the kernel's high-water mark of this process (``VmHWM`` in ``/proc/self/status``; a forked child's
``ru_maxrss`` would start at its parent's). ``HighWater``: a thread samples the current resident set
(``/proc/self/statm``) every ``interval`` seconds and, each time it passes its last record by ``step`` bytes, records
the main thread's innermost frames in the project's own code — so a peak is named by the line that was running when
it was reached (a line running a C call, a matmul, say, holds its frame while the call allocates).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tuple(str(ROOT / part) for part in ("core", "assets", "orchestration"))
PAGE = os.sysconf("SC_PAGE_SIZE")
GIB = 1 << 30


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss() -> int:
    """This process's resident set size now, in bytes (``/proc/self/statm``'s second field, in pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


@dataclass
class HighWater:
    """Records ``(seconds since start, rss bytes, innermost project frames)`` at each new high of the resident set
    (use as a context manager around the code to trace)."""

    interval: float = 0.005
    step: int = 32 << 20
    depth: int = 4
    records: list[tuple[float, int, list[str]]] = field(default_factory=list)

    def __enter__(self) -> HighWater:
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        last = 0
        while not self._stop.wait(self.interval):
            rss = current_rss()
            if rss < last + self.step:
                continue
            last = rss
            self.records.append((time.perf_counter() - self._start, rss, self._main_frames()))

    def _main_frames(self) -> list[str]:
        """The main thread's innermost project frames, as text. The frame object is dropped on return: held, it
        would keep that call's locals (its tensors) alive after the call ends, inflating what is measured."""
        frame = sys._current_frames().get(self._main)  # the way to read another thread's frames
        summary = traceback.extract_stack(frame) if frame is not None else []
        ours = [
            f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} {f.name}"
            for f in summary
            if f.filename.startswith(PROJECT)
        ]
        return ours[-self.depth :]

    def report(self, baseline: int = 0) -> str:
        """One line per record (GiB over ``baseline``), innermost frame last; the highest record marked."""
        if not self.records:
            return "no rise recorded"
        top = max(rss for _, rss, _ in self.records)
        lines = []
        for seconds, rss, frames in self.records:
            mark = "*" if rss == top else " "
            lines.append(f"{mark} {seconds:8.1f} s {(rss - baseline) / GIB:6.2f} GiB  {' > '.join(frames) or '-'}")
        return "\n".join(lines)
