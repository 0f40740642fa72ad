"""A training run SIGKILLed anywhere inside a checkpoint write resumes to bit-identical weights (issue 12 item 3).

For each pause point (slvit_fast.training.faults.POINTS) a fresh process trains with
SLVIT_FAST_TEST_CKPT_PAUSE=<point>@1, stops inside the write of epoch 1's checkpoint (or, for
best-written, in the final export) and the test SIGKILLs it there. One more process then resumes every
folder and trains an uninterrupted reference; weights, exported files and losses must match exactly, and no
temporary file may be left.
"""

import json
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slvit_fast.training.faults import ENV, POINTS
from slvit_fast.training.checkpointing import CheckpointDir

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ckpt_fault_worker.py"
# Generous for 8 processes that each import torch and train 1-2 epochs on 2 busy cores (about 15 s quiet):
# the deadlines exist so that a hang fails with the names of the stuck runs instead of stalling CI.
KILL_DEADLINE_S = 240
RESUME_DEADLINE_S = 300


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", **extra}
    env.pop(ENV, None)
    env.update(extra)
    return env


def _kill_at(points: list[str], tmp_path: Path, deadline_s: float = KILL_DEADLINE_S) -> dict[str, list[str]]:
    """Start one paused run per point, SIGKILL each at its point; files left per point.

    Every child has its own stdout pipe (lines from several writers on one pipe can interleave), and a
    deadline turns a child that never reaches its point into a failure naming it instead of a hang.
    """
    children, logs = {}, {}
    sel = selectors.DefaultSelector()
    try:
        for p in points:
            spec = p + ("@2" if p == "best-written" else "@1")  # best is written after the last epoch
            logs[p] = open(tmp_path / f"{p}.stderr", "w+")
            children[p] = subprocess.Popen([sys.executable, str(WORKER), "child", str(tmp_path / p)],
                                           stdout=subprocess.PIPE, stderr=logs[p], env=_env(**{ENV: spec}))
            sel.register(children[p].stdout, selectors.EVENT_READ, p)
        said = {p: b"" for p in points}
        end = time.monotonic() + deadline_s
        while sel.get_map():
            ready = sel.select(timeout=max(0.0, end - time.monotonic()))
            if not ready:
                late = [k.data for k in sel.get_map().values()]
                pytest.fail(f"runs still going after {deadline_s:.0f} s: {late}; their stdout/stderr: "
                            + "; ".join(f"{p}: {said[p]!r} / {_tail(logs[p])!r}" for p in late))
            for key, _ in ready:
                p = key.data
                chunk = os.read(key.fd, 4096)
                said[p] += chunk
                if chunk == b"":
                    sel.unregister(key.fileobj)
                elif f"SLVIT_FAST_CKPT_PAUSE {p}".encode() in said[p]:
                    children[p].kill()
        codes = {p: c.wait(timeout=60) for p, c in children.items()}
        failed = {p: (codes[p], said[p].decode(errors="replace"), _tail(logs[p])) for p in points
                  if codes[p] != -signal.SIGKILL or b"SLVIT_FAST_CKPT_PAUSE" not in said[p]}
        assert not failed, f"runs that did not stop at their point (exit code, stdout, stderr): {failed}"
    finally:
        sel.close()
        for c in children.values():
            if c.poll() is None:
                c.kill()
            c.wait()
            c.stdout.close()
        for f in logs.values():
            f.close()
    return {p: sorted(q.name for q in (tmp_path / p).iterdir()) for p in points}


def _tail(f, n: int = 2000) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-n:]


def test_kill_inside_checkpoint_write_resumes_bit_identical(tmp_path):
    points = list(POINTS)
    assert len(points) >= 5
    left = _kill_at(points, tmp_path)
    # the kills landed inside the writes: temporary files are there when the write was torn
    for point in ("state-partial", "state-written", "exits-written", "best-written"):
        assert any(n.endswith(".tmp") for n in left[point]), (point, left[point])
    assert all(n != "best.safetensors" for p in points for n in left[p])

    dirs = [str(tmp_path / p) for p in points] + [str(tmp_path / "reference")]
    out = subprocess.run([sys.executable, str(WORKER), "run", *dirs], capture_output=True, text=True, env=_env(),
                         timeout=RESUME_DEADLINE_S)
    assert out.returncode == 0, out.stderr[-3000:]
    runs = {Path(r["dir"]).name: r for r in map(json.loads, out.stdout.strip().splitlines())}
    ref = runs.pop("reference")
    assert ref["epochs"] == [0, 1, 2]
    for point, r in runs.items():
        assert r["weights"] == ref["weights"], f"killed at {point}: final weights differ from an uninterrupted run"
        assert r["files"] == ref["files"], f"killed at {point}: exported files differ"
        assert r["losses"] == ref["losses"] and r["epochs"] == ref["epochs"], point
        assert not [n for n in os.listdir(tmp_path / point) if n.endswith(".tmp")], point


def test_a_run_stuck_before_its_point_fails_instead_of_hanging(tmp_path):
    """The watchdog: a child that does not reach its point in time fails the test, and is killed."""
    with pytest.raises(pytest.fail.Exception, match=r"runs still going after 1 s: \['begin'\]"):
        _kill_at(["begin"], tmp_path, deadline_s=1)  # importing torch alone takes longer than 1 s


def test_unknown_pause_point_is_an_error(monkeypatch):
    from slvit_fast.training.faults import pause_point

    monkeypatch.setenv(ENV, "nowhere@1")
    with pytest.raises(ValueError, match="unknown point 'nowhere'"):
        pause_point("begin", 1)


def test_resume_restores_the_random_number_state(tmp_path):
    """A shuffling loader draws from the global RNG: a resumed run must see the same order as an unbroken one."""
    sys.path.insert(0, str(HERE))
    from ckpt_fault_worker import run

    import slvit_fast.training as T
    from training_fixtures import loader, quadrant_task, tiny_net

    n = torch.get_num_threads()
    try:
        ref = run(str(tmp_path / "ref"))
        T.train_exits(tiny_net(), loader(quadrant_task(32), batch_size=8, shuffle=True),
                      loader(quadrant_task(16, seed=1)), epochs=3, lr=2e-3, checkpoint_dir=tmp_path / "cut",
                      progress=False, stop_after_epoch=0)
        torch.manual_seed(1234)  # whatever the process did in between must not matter
        resumed = run(str(tmp_path / "cut"))
    finally:
        torch.set_num_threads(n)
    assert resumed["weights"] == ref["weights"] and resumed["losses"] == ref["losses"]


def test_resume_from_a_checkpoint_of_the_previous_format(tmp_path):
    """Folders written before the one-file commit (exits only in last.safetensors) are refused (they record
    neither the exits' configs nor the backbone, so a resume onto another model would go unnoticed) until
    upgrade_checkpoint adopts them; then they resume exactly."""
    from training_fixtures import loader, quadrant_task, tiny_net
    from slvit_fast.errors import CheckpointMismatchError
    from slvit_fast.training import train_exits
    from slvit_fast.training.checkpointing import upgrade_checkpoint

    train, val = loader(quadrant_task(32)), loader(quadrant_task(16, seed=1))
    straight = tiny_net()
    train_exits(straight, train, val, epochs=2, lr=2e-3, progress=False)
    train_exits(tiny_net(), train, val, epochs=2, lr=2e-3, checkpoint_dir=tmp_path, stop_after_epoch=0, progress=False)
    state = CheckpointDir(tmp_path).read()  # the payload inside the checksum envelope
    old = {k: v for k, v in state.items() if k not in ("format", "exits", "rng")}
    torch.save(old, tmp_path / "training_state.pt")
    resumed = tiny_net(seed=7)
    resumed.backbone.load_state_dict(straight.backbone.state_dict())
    with pytest.raises(CheckpointMismatchError, match="written by an older slvit_fast"):
        train_exits(resumed, train, val, epochs=2, lr=2e-3, checkpoint_dir=tmp_path, progress=False)
    upgrade_checkpoint(tmp_path, resumed)
    train_exits(resumed, train, val, epochs=2, lr=2e-3, checkpoint_dir=tmp_path, progress=False)
    for k, v in straight.exits.state_dict().items():
        assert torch.equal(resumed.exits.state_dict()[k], v), k
