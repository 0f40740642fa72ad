"""time_interleaved: rotation and the untimed call that opens each round (slvit_fast/bench/timing.py)."""

import time

from slvit_fast.bench.timing import time_interleaved


def _switch_costly_impls(calls: list[str], switch_s: float = 0.02):
    """Three implementations whose first call after another one ran is slow (a cold-cache switch); with
    three, the rotation puts a switch before every round of each."""
    last = {"name": None}

    def make(name):
        def run():
            calls.append(name)
            if last["name"] not in (None, name):
                time.sleep(switch_s)
            last["name"] = name
        return run

    return {"a": make("a"), "b": make("b"), "c": make("c")}


def test_round_warmup_keeps_the_switch_cost_out_of_the_timed_calls():
    calls: list[str] = []
    cold = time_interleaved(_switch_costly_impls(calls), repeats=4, inner=4, warmup=1)
    calls_warm: list[str] = []
    warm = time_interleaved(_switch_costly_impls(calls_warm), repeats=4, inner=4, warmup=1, round_warmup=1)
    for name in ("a", "b", "c"):
        # without it every round carries one 20 ms switch over 4 calls; with it none does
        assert cold[name].median_s > 0.004, cold[name]
        assert warm[name].median_s < 0.002, warm[name]
    # the warm-up is one extra call per implementation and round, in the same rotation
    assert len(calls_warm) - len(calls) == 3 * 4
    assert calls_warm[-15:] == ["a"] * 5 + ["b"] * 5 + ["c"] * 5  # round 4 (r = 3) starts with a again


def test_inner_count_comes_from_the_slowest_implementation():
    n = {"fast": 0, "slow": 0}

    def fast():
        n["fast"] += 1

    def slow():
        n["slow"] += 1
        time.sleep(0.01)

    t = time_interleaved({"fast": fast, "slow": slow}, repeats=2, warmup=1, target_round_s=0.05)
    assert n["fast"] == n["slow"]  # the same inner count for both (about 5 here)
    assert 0.009 < t["slow"].median_s < 0.05 and t["fast"].median_s < 0.005
