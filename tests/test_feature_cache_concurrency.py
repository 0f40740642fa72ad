"""Two runs sharing one cache_dir at the same moment (issue 12 item 2): both finish, each on its own features.

Each worker process trains from the shared cache, then live; the two histories must agree. The loader
sleeps per batch so that the two builds overlap (they start together after a file barrier).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _race(tmp_path, seeds):
    cache_dir, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "cache_race_worker.py"), str(cache_dir), str(s), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in seeds]
    try:
        for p in procs:  # both imported torch and built their data: start them together
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-3000:]
        go.touch()
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"worker died with {p.returncode}:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        for cached, live in zip(r["cached"], r["live"]):
            assert cached == pytest.approx(live, rel=1e-5)
    leftovers = [p for p in cache_dir.rglob("*") if p.name.startswith(".") and not p.name.endswith(".lock")]
    assert not leftovers, leftovers
    return results


def test_two_runs_on_different_data_share_a_cache_dir(tmp_path):
    results = _race(tmp_path, [0, 1])
    assert [sorted(r["built"]) for r in results] == [["train", "val"], ["train", "val"]]
    assert len([p for p in (tmp_path / "cache" / "train").iterdir() if not p.name.startswith(".")]) == 2


def test_two_runs_on_the_same_data_build_once(tmp_path):
    results = _race(tmp_path, [0, 0])
    # each split built by exactly one of the two; the other waited for the lock and read it
    assert sorted(results[0]["built"] + results[1]["built"]) == ["train", "val"]
    assert len([p for p in (tmp_path / "cache" / "train").iterdir() if not p.name.startswith(".")]) == 1
