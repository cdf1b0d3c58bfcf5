"""agent-bench's frame rate: measured between completed loop turns, not by counting frames in a fixed window."""

from __future__ import annotations

import pytest

from app.agent_bench import completion_rate, turns_between


def test_rate_runs_from_first_to_last_completion_in_the_window() -> None:
    turns = [(9.0, 1), (10.5, 1), (16.5, 2), (22.5, 1), (31.0, 1)]  # (end time, frames)
    r = completion_rate(turns, 10.0, 30.0)
    # turns at 10.5, 16.5, 22.5 lie in the window; the first opens it, the 3 frames after it took 12 s
    assert r["turns"] == 3 and r["frames"] == 3
    assert r["fps"] == pytest.approx(3 / 12.0)
    # counting frames in the 20-s window would say 4 / 20 = 0.2 frames/s
    assert turns_between(turns, 10.0, 30.0) == [(10.5, 1), (16.5, 2), (22.5, 1)]


def test_rate_is_none_below_two_turns() -> None:
    r = completion_rate([(5.0, 3)], 0.0, 10.0)
    assert r == {"fps": None, "frames": 3, "turns": 1}
    assert completion_rate([], 0.0, 1.0)["fps"] is None
