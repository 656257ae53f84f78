"""``benchmarks/memory.py``'s profiler must not change what it measures: a sample that names the running line
must not keep that line's frame (and so its locals: tensors, frames) alive once the call has returned."""

from __future__ import annotations

import time
import weakref

import pytest

from benchmarks.memory import HighWater, current_rss

pytestmark = pytest.mark.unit


class Held:
    """An object with a weak reference: alive exactly while something holds it."""


def _hold_while_sampled(seconds: float) -> weakref.ref[Held]:
    held = Held()
    time.sleep(seconds)  # the profiler samples while this frame is the main thread's innermost
    return weakref.ref(held)


def test_a_recorded_sample_does_not_keep_the_sampled_call_s_locals() -> None:
    # one record only: the first sample passes the step (rss > step), no later one does (rss < rss + step)
    with HighWater(interval=0.001, step=current_rss() // 2) as trace:
        ref = _hold_while_sampled(0.05)
        time.sleep(0.01)
        alive = ref() is not None
    assert len(trace.records) == 1
    assert not alive
