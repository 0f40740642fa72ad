"""A `train` SIGKILLed while it publishes its run never loses a run: before the commit record the previous run
is untouched, after it the next `evaluate` (or `train`) of the folder finishes the moves, and the result is
bit-for-bit the run a fault-free process writes.

Each case copies one finished run (the "old" run), lets tests/publish_fault_worker.py train a different run
into the copy (another split seed) and kill itself at a chosen point of publishing, then evaluates the copy.
The reference is the same worker run without a kill. resnet18 at 16x16, one exit epoch: ~5 s per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from slvit_fast.workflow import RunSpec, UsageError, evaluate_run, run_experiment
from slvit_fast.workflow import rundir as R

HERE = Path(__file__).resolve().parent
WORKER = HERE / "publish_fault_worker.py"
N = 90


def _spec(data: Path, out: Path, **kw) -> dict:
    args = dict(data=str(data), backbone="resnet18", out=str(out), input_size=16, epochs=1, batch_size=16,
                timing_repeats=1, early_stopping_patience=None)
    args.update(kw)
    return args


NEW = {"seed": 1}  # the run that gets killed: another split than the old run's seed 0
MULTI = {"seed": 1, "exit_types": ["slvit", "cnn"]}  # the demo's layout: OUT/slvit, OUT/cnn, the record in OUT


def _worker(spec: dict, point: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec), point], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _state(run_dir: Path) -> dict:
    """What evaluate serves: run.json (with the sha256 of the policy and the backbone weights), the policy, and
    the exits' tensors and metadata. The exits file's own sha256 is left out: safetensors writes its metadata
    map in a per-process order, so equal exits from two processes differ in bytes (evaluate checks the file
    against run.json's sha256 of it, which the cases below run)."""
    from safetensors import safe_open

    run = json.loads((run_dir / R.RUN_FILE).read_text())
    run["sha256"].pop(R.EXITS_FILE)
    with safe_open(str(run_dir / R.EXITS_FILE), "pt") as f:
        exits = {k: hashlib.sha256(f.get_tensor(k).numpy().tobytes()).hexdigest() for k in f.keys()}
        meta = f.metadata()
    return {"run": run, "policy": (run_dir / R.POLICY_FILE).read_text(), "exits": exits, "meta": meta}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The data, the old run, and every worker's folder after it ran (fault-free references and kills), the
    workers run two at a time."""
    root = tmp_path_factory.mktemp("publish_faults")
    rng = np.random.default_rng(0)
    y = np.arange(N) % 3
    x = rng.integers(0, 60, size=(N, 8, 8)).astype(np.uint8)
    for k in range(3):
        x[y == k, 2 * k:2 * k + 3, :] += 150
    data = root / "data.npz"
    np.savez(data, x=x, y=y)
    old = root / "old"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment(RunSpec(**_spec(data, old)))
    finally:
        torch.set_num_threads(threads)
    jobs = {("ref", "single"): (NEW, "none"), ("ref", "multi"): (MULTI, "none"),
            **{(p, "single"): (NEW, p) for p in (R.PUBLISH_FILE, R.BACKBONE_FILE, R.EXITS_FILE, R.REPORT_FILE,
                                                 R.RUN_FILE, "cleanup")},
            ("run.json", "multi"): (MULTI, R.RUN_FILE), ("policy.json", "multi"): (MULTI, R.POLICY_FILE)}
    folders, codes, errs = {}, {}, {}
    pending = list(jobs.items())
    while pending:
        batch, pending = pending[:2], pending[2:]
        procs = {}
        for key, (kw, point) in batch:
            folders[key] = root / f"{key[0].strip('.')}-{key[1]}"
            shutil.copytree(old, folders[key])
            procs[key] = _worker(_spec(data, folders[key], **kw), point)
        for key, p in procs.items():
            _, errs[key] = p.communicate(timeout=600)
            codes[key] = p.returncode
    return {"data": data, "old": old, "folders": folders, "codes": codes, "errs": errs}


def _killed(world, key, tmp_path: Path) -> Path:
    """A copy of the folder the worker of ``key`` was killed in (the cases must not finish each other's)."""
    assert world["codes"][key] == -signal.SIGKILL, (key, world["codes"][key], world["errs"][key][-2000:])
    out = tmp_path / "out"
    shutil.copytree(world["folders"][key], out)
    return out


def test_the_references_ran_to_the_end(world):
    for layout in ("single", "multi"):
        assert world["codes"][("ref", layout)] == 0, world["errs"][("ref", layout)][-2000:]
    ref = world["folders"][("ref", "single")]
    assert _state(ref) != _state(world["old"])  # the new run differs, so the cases below can tell them apart
    assert not (ref / R.PUBLISH_FILE).exists() and not list(ref.glob(R.STAGE_PREFIX + "*"))


def test_killed_before_the_commit_record_leaves_the_old_run(world, tmp_path):
    out = _killed(world, (R.PUBLISH_FILE, "single"), tmp_path)
    assert not (out / R.PUBLISH_FILE).exists()
    assert _state(out) == _state(world["old"])
    got = evaluate_run(out, world["data"], quiet=True)
    want = evaluate_run(world["old"], world["data"], quiet=True)
    assert got["early_exit"] == want["early_exit"]


@pytest.mark.parametrize("point", [R.BACKBONE_FILE, R.EXITS_FILE, R.REPORT_FILE, R.RUN_FILE, "cleanup"])
def test_killed_after_the_commit_evaluate_finishes_the_new_run(world, point, caplog, tmp_path):
    out = _killed(world, (point, "single"), tmp_path)
    assert (out / R.PUBLISH_FILE).is_file()  # killed with the record in place
    ref = world["folders"][("ref", "single")]
    with caplog.at_level("WARNING", logger="slvit_fast.workflow"):
        got = evaluate_run(out, world["data"], quiet=True)
    assert "finished publishing the run an interrupted 'slvit-fast train' had committed" in caplog.text
    assert _state(out) == _state(ref)  # bit-for-bit the fault-free run's (evaluate_run has just checked
    # every file against the sha256 run.json pins)
    assert got["early_exit"] == evaluate_run(ref, world["data"], quiet=True)["early_exit"]
    assert not (out / R.PUBLISH_FILE).exists() and not list(out.glob(R.STAGE_PREFIX + "*"))


@pytest.mark.parametrize("point", [R.RUN_FILE, R.POLICY_FILE])
def test_killed_publishing_per_type_folders_is_finished_from_either_folder(world, point, tmp_path):
    """The demo's layout: the record is in OUT, evaluate is pointed at OUT/slvit (which may not exist yet)."""
    out = _killed(world, (point, "multi"), tmp_path)
    ref = world["folders"][("ref", "multi")]
    for t in ("slvit", "cnn"):
        evaluate_run(out / t, world["data"], quiet=True)
        assert _state(out / t) == _state(ref / t)
    assert not (out / R.RUN_FILE).exists()  # the old single run at OUT's level was replaced by the folders
    assert not (out / R.PUBLISH_FILE).exists() and not list(out.glob(R.STAGE_PREFIX + "*"))


def test_the_next_train_finishes_an_interrupted_publish_first(tmp_path, world):
    """train rolls the committed run forward before it reads anything (its --weights may be that run's
    backbone.safetensors: review 11), even when its own checks then refuse it."""
    out = _killed(world, (R.EXITS_FILE, "single"), tmp_path)
    with pytest.raises(UsageError, match="--fractions"):
        run_experiment(RunSpec(**_spec(world["data"], out, fractions=[0.5])))
    assert not (out / R.PUBLISH_FILE).exists()
    assert _state(out) == _state(world["folders"][("ref", "single")])


def test_evaluate_dot_in_a_per_type_folder_finishes_the_publish(tmp_path, world, monkeypatch):
    """`cd OUT/slvit && slvit-fast evaluate --run .`: Path('.').parent is '.', so the record in OUT was not
    found and the run looked lost (review 11)."""
    out = _killed(world, (R.RUN_FILE, "multi"), tmp_path)
    (out / "slvit").mkdir(exist_ok=True)
    monkeypatch.chdir(out / "slvit")
    evaluate_run(".", world["data"], quiet=True)
    assert _state(out / "slvit") == _state(world["folders"][("ref", "multi")] / "slvit")


def test_a_record_that_cannot_be_finished_is_not_served_as_the_old_run(tmp_path, world, monkeypatch):
    """A read-only copy (here: the lock cannot be opened) killed right after the record still holds the old
    run's files: evaluate must not serve them as the folder's run (review 11)."""
    out = _killed(world, (R.EXITS_FILE, "single"), tmp_path)

    def read_only(folder):
        raise PermissionError(13, "Read-only file system", str(folder))

    monkeypatch.setattr(R, "_try_lock", read_only)
    with pytest.raises(UsageError, match="holds a finished run whose publishing was interrupted.*with write access"):
        evaluate_run(out, world["data"], quiet=True)


def test_evaluate_reads_the_run_under_the_publish_lock(tmp_path, world, monkeypatch):
    """While evaluate checks and loads a run's files, a publish into the folder waits (review 11: one run's
    exits were loaded with the other run's split)."""
    import fcntl

    from slvit_fast import presets

    out = tmp_path / "out"
    shutil.copytree(world["old"], out)
    real_build, seen = presets.build, []

    def build(*args, **kwargs):
        with open(out / R.PUBLISH_LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("publish could run")
            except BlockingIOError:
                seen.append("publish waits")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(presets, "build", build)
    evaluate_run(out, world["data"], quiet=True)
    assert seen == ["publish waits"]


def test_a_destination_on_another_file_system_fails_before_the_commit(tmp_path, world):
    """A per-type run folder symlinked to another file system: the first rename after the commit failed, and
    every roll-forward after it - both runs lost (review 11). Now found before anything is deleted."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temporary folder")
    out = tmp_path / "out"
    shutil.copytree(world["old"], out)
    elsewhere = Path(tempfile.mkdtemp(dir=shm))
    try:
        (out / "slvit").symlink_to(elsewhere)
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and "lock" not in p.name}
        with pytest.raises(UsageError, match=r"a file cannot be moved from .* into .*another file system or mount"):
            run_experiment(RunSpec(**_spec(world["data"], out, **MULTI)))
        after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and "lock" not in p.name}
        assert after == before  # the old run's files as they were, no record
        assert not list(out.glob(R.STAGE_PREFIX + "*"))
        evaluate_run(out, world["data"], quiet=True)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_killed_record_write_leaves_no_temporary_file_behind(tmp_path, world):
    out = tmp_path / "out"
    shutil.copytree(world["old"], out)
    tmp = out / f".{R.PUBLISH_FILE}.abc123.tmp"  # what a kill inside the record's atomic write leaves
    tmp.write_text("{")
    run_experiment(RunSpec(**_spec(world["data"], out)))
    assert not tmp.exists()


def test_a_hand_edited_record_is_a_usage_error(tmp_path, world):
    out = _killed(world, (R.EXITS_FILE, "single"), tmp_path)
    (out / R.PUBLISH_FILE).write_text(json.dumps({"stage": "../elsewhere", "run_dirs": ["."]}))
    with pytest.raises(UsageError, match=r"is not a publishing record of slvit-fast.*delete .*\.publishing\.json"):
        with R.locked_out(out):
            pass
    (out / R.PUBLISH_FILE).write_text('{"stage": ')  # truncated: the same way out
    with pytest.raises(UsageError, match=r"is not readable .*delete .*\.publishing\.json"):
        evaluate_run(out, world["data"], quiet=True)


# -- review 11, second round -------------------------------------------------------------------------------
def test_evaluate_of_a_per_type_run_holds_the_folder_of_its_backbone(tmp_path, world, monkeypatch):
    """OUT/slvit pins ../backbone.safetensors: a single-type train publishing into OUT (which replaces that
    file) must wait while evaluate of OUT/slvit checks and loads it (it served a mixed backbone)."""
    import fcntl

    from slvit_fast import presets

    out = tmp_path / "out"
    shutil.copytree(world["folders"][("ref", "multi")], out)
    real_build, seen = presets.build, []

    def build(*args, **kwargs):
        with open(out / R.PUBLISH_LOCK, "a+") as f:  # what a publish into OUT takes
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("publish could run")
            except BlockingIOError:
                seen.append("publish waits")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(presets, "build", build)
    evaluate_run(out / "slvit", world["data"], quiet=True)
    assert seen == ["publish waits"]


def test_train_rolls_the_folder_of_its_weights_forward_first(tmp_path, world):
    """--weights X/backbone.safetensors where X holds a committed, not yet moved-in run: the new run must be
    trained on X's committed backbone, not the superseded one still in place (review 11)."""
    x = _killed(world, (R.BACKBONE_FILE, "single"), tmp_path)
    ref = world["folders"][("ref", "single")]
    assert R.file_sha256(x / R.BACKBONE_FILE) != R.file_sha256(ref / R.BACKBONE_FILE)  # the old one, in place
    out = tmp_path / "new"
    run_experiment(RunSpec(**_spec(world["data"], out, weights=str(x / R.BACKBONE_FILE))))
    assert not (x / R.PUBLISH_FILE).exists()
    assert R.read_run(out)["sha256"]["weights"] == R.file_sha256(ref / R.BACKBONE_FILE)
    evaluate_run(x, world["data"], quiet=True)  # and X is its committed run, untouched since
    assert _state(x) == _state(ref)


def test_a_parents_record_for_another_folder_does_not_hold_up_evaluate(tmp_path, world):
    """A single-type run committed into OUT (its record names OUT only) says nothing about OUT/exp2."""
    out = _killed(world, (R.EXITS_FILE, "single"), tmp_path)
    shutil.copytree(world["old"], out / "exp2")
    with R.reading_run(out / "exp2") as run:  # (without rolling OUT forward: not this folder's business)
        assert run["data"]["seed"] == 0
    assert (out / R.PUBLISH_FILE).is_file()


def test_evaluate_of_a_folder_that_is_no_run_leaves_no_lock_file(tmp_path, world):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("x")
    with pytest.raises(UsageError, match="is not a run directory"):
        evaluate_run(folder, world["data"], quiet=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_a_wait_for_a_held_lock_says_what_it_waits_for(tmp_path, caplog):
    import fcntl
    import threading

    path = tmp_path / R.PUBLISH_LOCK
    with open(path, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        threading.Timer(0.3, fcntl.flock, (holder, fcntl.LOCK_UN)).start()
        with open(path, "a+") as f, caplog.at_level("WARNING", logger="slvit_fast.workflow"):
            R._flock_waiting(f, fcntl.LOCK_SH, str(path))  # returns once the holder lets go
    assert f"waiting for {path} (another slvit-fast train or evaluate is publishing into it)" in caplog.text


def test_the_demo_does_not_overwrite_the_data_of_a_run_in_progress(tmp_path):
    """A second demo into OUT while the first trains (its lock held, no run.json yet) rewrote OUT/digits.npz
    before it was refused (review 11): it now writes a content-named file."""
    import fcntl

    from slvit_fast.workflow import digits

    out = tmp_path / "demo"
    out.mkdir()
    first = digits._demo_data(out, 120, 0)
    before = first.read_bytes()
    with open(out / R.LOCK_FILE, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = digits._demo_data(out, 150, 0)
    assert first.read_bytes() == before and second != first and second.name.startswith("digits-")


def test_a_single_run_into_a_demo_out_supersedes_the_runs_using_its_backbone(tmp_path, world, caplog):
    """A single-type run into OUT rewrites OUT/backbone.safetensors, which the per-type runs in OUT/slvit and
    OUT/cnn pin (../backbone.safetensors): they could never be evaluated again (review 11). They are
    superseded, as per-type folders supersede a single run; a run in OUT that uses its own files is kept."""
    out = tmp_path / "out"
    shutil.copytree(world["folders"][("ref", "multi")], out)
    shutil.copytree(world["old"], out / "own")  # its run.json pins own/backbone.safetensors
    with caplog.at_level("WARNING", logger="slvit_fast.workflow"):
        run_experiment(RunSpec(**_spec(world["data"], out)))
    for t in ("slvit", "cnn"):
        assert not (out / t / R.RUN_FILE).exists()
        assert f"the run in {out / t} used" in caplog.text
    evaluate_run(out, world["data"], quiet=True)
    evaluate_run(out / "own", world["data"], quiet=True)


def test_small_errors_name_what_the_user_gave(tmp_path, world):
    """--run pointing at run.json says to pass the folder; a demo's per-type folder that is a file is named as
    such, not as an --out the user never passed; a killed `train --out OUT/slvit`'s staging folder is removed
    by the next run that writes OUT/slvit (review 11)."""
    with pytest.raises(UsageError, match=r"run\.json' is a file; --run takes the run's folder"):
        evaluate_run(world["old"] / R.RUN_FILE, world["data"], quiet=True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "slvit").write_text("not a folder")
    with pytest.raises(UsageError, match=r"the slvit exits' folder '.*slvit' is a file, not a folder"):
        run_experiment(RunSpec(**_spec(world["data"], out, **MULTI)))
    (out / "slvit").unlink()
    left = out / "slvit" / f"{R.STAGE_PREFIX}4242"
    left.mkdir(parents=True)
    run_experiment(RunSpec(**_spec(world["data"], out, **MULTI)))
    assert not left.exists()


# -- review 11, third round --------------------------------------------------------------------------------
def test_a_rerun_that_writes_the_same_backbone_keeps_the_runs_using_it(tmp_path, world):
    """A run in OUT/sub trained on --weights OUT/backbone.safetensors stays when OUT is trained again and the
    file comes back with the same bytes (it was superseded regardless)."""
    out = tmp_path / "out"
    shutil.copytree(world["old"], out)
    run_experiment(RunSpec(**_spec(world["data"], out / "sub", weights=str(out / R.BACKBONE_FILE))))
    before = R.file_sha256(out / R.BACKBONE_FILE)
    run_experiment(RunSpec(**_spec(world["data"], out)))  # the old run's spec again: same random backbone
    assert R.file_sha256(out / R.BACKBONE_FILE) == before
    assert (out / "sub" / R.RUN_FILE).is_file()
    evaluate_run(out / "sub", world["data"], quiet=True)


def test_evaluate_dot_holds_the_parent_folder_too(tmp_path, world, monkeypatch):
    """`--run .` inside OUT/slvit: Path('.').parent is '.', so OUT's publish lock was not held and a single run
    into OUT could replace ../backbone.safetensors during the loads (review 11)."""
    import fcntl

    from slvit_fast import presets

    out = tmp_path / "out"
    shutil.copytree(world["folders"][("ref", "multi")], out)
    real_build, seen = presets.build, []

    def build(*args, **kwargs):
        with open(out / R.PUBLISH_LOCK, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append("publish could run")
            except BlockingIOError:
                seen.append("publish waits")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(presets, "build", build)
    monkeypatch.chdir(out / "slvit")
    evaluate_run(".", world["data"], quiet=True)
    assert seen == ["publish waits"]


def test_leftovers_of_killed_runs_are_removed(tmp_path):
    for name in (f"{R.STAGE_PREFIX}77", f".{R.PUBLISH_FILE}.x1.tmp", ".slvit-fast.rename-probe-77"):
        (tmp_path / name).mkdir() if name.startswith(R.STAGE_PREFIX) else (tmp_path / name).write_text("")
    (tmp_path / "keep.txt").write_text("")
    R.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
