"""A run directory is never silently a mix of two runs, and evaluate says when its inputs are not the run's.

`slvit-fast train --data ... --out OUT` locks OUT, deletes the run.json it replaces before writing anything,
checks everything a user can get wrong (the --fractions count too) before touching OUT, and writes run.json
last with the sha256 of the files it references; `evaluate` checks them, and the data's content fingerprint.
The feature cache in OUT/cache is keyed by that content fingerprint (its own check hashes only the first and
last batch). In process, on tiny data, resnet18 at 16x16 with one exit epoch: a few seconds per run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from slvit_fast.workflow import RunSpec, UsageError, evaluate_run, run_experiment
from slvit_fast.workflow import data as D
from slvit_fast.workflow import experiment as E
from slvit_fast.workflow import rundir as R

N = 90  # 62 train / 14 val / 14 test: the training split has a middle outside its first and last batch of 16


def _spec(data: Path, out: Path, **kw) -> RunSpec:
    args = dict(data=str(data), backbone="resnet18", out=str(out), input_size=16, epochs=1, batch_size=16,
                timing_repeats=1, early_stopping_patience=None)
    args.update(kw)
    return RunSpec(**args)


def _arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(N) % 3
    x = rng.integers(0, 60, size=(N, 8, 8)).astype(np.uint8)
    for k in range(3):  # class k brightens row band k: learnable
        x[y == k, 2 * k:2 * k + 3, :] += 150
    return x, y


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    x, y = _arrays()
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def complete_run(npz, tmp_path_factory) -> Path:
    """One finished run (random backbone, so OUT/backbone.safetensors is written); tests change copies."""
    out = tmp_path_factory.mktemp("runs") / "base"
    run_experiment(_spec(npz, out))
    return out


@pytest.fixture
def run_copy(complete_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(complete_run, out)
    return out


@pytest.fixture
def warnings_seen():
    """WARNING records of the workflow logger (its own handler: the CLI may have turned propagation off)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("slvit_fast.workflow")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _resave_safetensors(path: Path) -> None:
    """A valid file of the same layout with other values (what another run would have written)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(path), metadata=meta)


# -- the lock ----------------------------------------------------------------------------------------
def test_a_second_run_into_a_locked_out_fails_at_once(npz, run_copy):
    before = _snapshot(run_copy)
    with open(run_copy / R.LOCK_FILE, "a+") as held:  # as a run that is writing OUT holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=f"another slvit-fast run is writing '{run_copy}' right now"):
            run_experiment(_spec(npz, run_copy, epochs=50))
        assert _snapshot(run_copy) == before  # nothing written, nothing deleted
        # while it writes, evaluate says so (run.json is gone until that run commits)
        (run_copy / R.RUN_FILE).unlink()
        with pytest.raises(UsageError, match="is being written by a training run right now"):
            evaluate_run(run_copy, npz, quiet=True)


def test_a_per_type_run_and_a_run_into_its_folder_exclude_each_other(npz, run_copy):
    """A demo-style run into OUT writes OUT/slvit and OUT/cnn: it holds their locks too, so it and a
    `train --out OUT/slvit` never write one folder at the same time (whichever comes second fails at once)."""
    (run_copy / "slvit").mkdir()
    before = _snapshot(run_copy)
    with open(run_copy / "slvit" / R.LOCK_FILE, "a+") as held:  # as `train --out OUT/slvit` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=f"another slvit-fast run is writing '{run_copy / 'slvit'}' right now"):
            run_experiment(_spec(npz, run_copy, exit_types=("slvit", "cnn")))
    after = _snapshot(run_copy)
    after.pop(f"slvit/{R.LOCK_FILE}"), after.pop(f"cnn/{R.LOCK_FILE}", None)
    assert after == before
    assert not list(run_copy.glob(R.STAGE_PREFIX + "*"))


# -- one commit point ----------------------------------------------------------------------------------
def test_a_run_killed_during_exit_training_leaves_the_previous_run_intact(npz, run_copy, monkeypatch):
    """The run is staged inside OUT and published at the end (review 10: deleting run.json up front threw the
    previous good run away whenever the new one failed late, e.g. a --budget below every policy)."""
    before = _snapshot(run_copy)
    expected = evaluate_run(run_copy, npz, quiet=True)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as SIGINT in the middle of exit training

    monkeypatch.setattr(E, "train_exits", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_spec(npz, run_copy, train_backbone_epochs=1))  # a fine-tuned backbone is saved (staged)
    assert _snapshot(run_copy) == before  # every file of the previous run as it was
    assert not list(run_copy.glob(R.STAGE_PREFIX + "*"))  # the staging folder is gone
    again = evaluate_run(run_copy, npz, quiet=True)
    assert again["early_exit"]["accuracy"] == expected["early_exit"]["accuracy"]
    # and the lock was released: the next run into OUT is not refused
    with open(run_copy / R.LOCK_FILE, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_run_interrupted_while_publishing_is_finished_by_evaluate(npz, run_copy, monkeypatch):
    """Past publishing's commit record the staged files are the run: an interruption in the middle of the moves
    (here KeyboardInterrupt in process; SIGKILL at every point in test_publish_faults.py) keeps them, and
    evaluate finishes moving them in instead of reporting a run lost."""
    real_publish, real_replace = R.publish, R.os.replace

    def dies_while_publishing(*args, **kwargs):
        calls = []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 3:  # 1: the commit record, 2: the first file moved in
                raise KeyboardInterrupt
            return real_replace(src, dst)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(R.os, "replace", replace)
            real_publish(*args, **kwargs)

    monkeypatch.setattr(R, "publish", dies_while_publishing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(_spec(npz, run_copy, seed=1))
    monkeypatch.undo()
    assert not (run_copy / R.RUN_FILE).exists() and (run_copy / R.PUBLISH_FILE).is_file()
    assert list(run_copy.glob(R.STAGE_PREFIX + "*"))  # kept: it holds the rest of the committed run
    evaluate_run(run_copy, npz, quiet=True)
    assert R.read_run(run_copy)["data"]["seed"] == 1  # the new run
    assert not list(run_copy.glob(R.STAGE_PREFIX + "*")) and not (run_copy / R.PUBLISH_FILE).exists()


def test_a_folder_with_run_files_but_no_run_json_is_an_incomplete_run(npz, run_copy):
    (run_copy / R.RUN_FILE).unlink()
    with pytest.raises(UsageError, match=r"holds an incomplete run: it has no run\.json.*interrupted"):
        evaluate_run(run_copy, npz, quiet=True)


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(npz, run_copy):
    left = run_copy / f"{R.STAGE_PREFIX}99999999"  # as a run killed before its commit record leaves it
    left.mkdir()
    (left / R.EXITS_FILE).write_bytes(b"half written")
    run_experiment(_spec(npz, run_copy))
    assert not left.exists()
    evaluate_run(run_copy, npz, quiet=True)


def test_a_new_run_keeps_the_files_it_or_other_runs_reference(npz, run_copy):
    """Publishing deletes only run.json files (review 10): a run trained with --weights OUT/backbone.safetensors
    (an earlier run's saved backbone) must not lose that file, and evaluates."""
    weights = run_copy / R.BACKBONE_FILE
    assert weights.is_file()
    run_experiment(_spec(npz, run_copy, weights=str(weights)))
    assert weights.is_file()
    run = R.read_run(run_copy)
    assert Path(run["weights"]).resolve() == weights.resolve()
    evaluate_run(run_copy, npz, quiet=True)


def test_a_multi_type_run_replaces_the_single_run_at_out_level(npz, run_copy):
    """A run with one folder per exit type replaces OUT's plot: the single run's run.json at OUT goes too
    (review 10: it stayed, and evaluate --run OUT served the old run with the new plot beside it)."""
    run_experiment(_spec(npz, run_copy, exit_types=("slvit", "cnn")))
    assert not (run_copy / R.RUN_FILE).exists()
    with pytest.raises(UsageError, match=r"sub-folder\(s\) cnn, slvit"):
        evaluate_run(run_copy, npz, quiet=True)
    evaluate_run(run_copy / "slvit", npz, quiet=True)
    evaluate_run(run_copy / "cnn", npz, quiet=True)


@pytest.mark.parametrize("fractions, match", [
    ([0.5], r"--fractions has 1 value but the resnet18 preset gives 2 early exits \(b1, b2\): give 2"),
    ([0.5, 0.3, 0.1], r"--fractions has 3 values but the resnet18 preset gives 2 early exits .*sum to 0\.9"),
])
def test_a_wrong_fractions_count_fails_before_out_changes(npz, run_copy, monkeypatch, fractions, match):
    before = _snapshot(run_copy)

    def no_training(*args, **kwargs):
        raise AssertionError("exit training started before --fractions was checked")

    monkeypatch.setattr(E, "train_exits", no_training)
    with pytest.raises(UsageError, match=match):
        run_experiment(_spec(npz, run_copy, fractions=fractions, train_backbone_epochs=1))
    assert _snapshot(run_copy) == before
    # the right count (or one per output, final included, summing to 1) passes the check
    E._check_fractions(_spec(npz, run_copy, fractions=[0.5, 0.3]), "resnet18")
    E._check_fractions(_spec(npz, run_copy, fractions=[0.5, 0.3, 0.2]), "resnet18")
    E._check_fractions(_spec(npz, run_copy, fractions=[0.5], exit_paths=["layer1"]), "resnet18")


def test_a_budget_below_the_first_exit_fails_before_out_changes(npz, run_copy, monkeypatch):
    """No policy can spend less than a sample leaving at the first exit: refused before any training."""
    before = _snapshot(run_copy)
    monkeypatch.setattr(E, "train_exits", lambda *a, **k: pytest.fail("exit training started"))
    with pytest.raises(UsageError, match=r"--budget 5 FLOPs per sample is below the cost of leaving at the first exit"):
        run_experiment(_spec(npz, run_copy, budget=5.0))
    assert _snapshot(run_copy) == before


def test_batch_size_1_fine_tuning_fails_before_out_changes(npz, run_copy, monkeypatch):
    """A BatchNorm backbone cannot fine-tune on 1-sample batches: refused before the lock deletes run.json."""
    before = _snapshot(run_copy)
    monkeypatch.setattr(E, "finetune_backbone", lambda *a, **k: pytest.fail("fine-tuning started"))
    with pytest.raises(UsageError, match="--batch-size 1 and 62 training sample.*use --batch-size 2 or more"):
        run_experiment(_spec(npz, run_copy, batch_size=1, train_backbone_epochs=1))
    assert _snapshot(run_copy) == before


# -- files pinned by content -------------------------------------------------------------------------
@pytest.mark.parametrize("name", [R.BACKBONE_FILE, R.EXITS_FILE, R.POLICY_FILE])
def test_a_file_changed_after_the_run_is_named_by_evaluate(npz, run_copy, name):
    assert evaluate_run(run_copy, npz, quiet=True)["early_exit"]["matches_brute_force"]
    path = run_copy / name
    if name == R.POLICY_FILE:
        path.write_text(json.dumps({"type": "MaxSoftmax", "thresholds": [0.4, 0.6]}))  # valid, but not the run's
    else:
        _resave_safetensors(path)
    with pytest.raises(UsageError, match=rf"{path} has changed since the run in {run_copy} was written"):
        evaluate_run(run_copy, npz, quiet=True)


def test_a_changed_weights_file_is_named_by_evaluate(npz, tmp_path):
    weights = tmp_path / "w.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    out = tmp_path / "run"
    run_experiment(_spec(npz, out, weights=str(weights)))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    torch.manual_seed(1)  # the user saves newer weights under the same name
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    with pytest.raises(UsageError, match=rf"{weights.resolve()} has changed since the run"):
        evaluate_run(out, npz, quiet=True)
    run = json.loads((out / R.RUN_FILE).read_text())
    assert run["weights"] == str(weights.resolve()) and not (out / R.BACKBONE_FILE).exists()
    assert run["sha256"]["weights"] == sha


def test_a_run_written_before_the_checks_still_evaluates(npz, run_copy, warnings_seen):
    run = json.loads((run_copy / R.RUN_FILE).read_text())
    run.pop("sha256", None), run["data"].pop("fingerprint", None)
    run["format"] = 1
    (run_copy / R.RUN_FILE).write_text(json.dumps(run))
    report = evaluate_run(run_copy, npz, quiet=True)
    assert report.get("data_matches_run", "missing") is None and report["early_exit"]["matches_brute_force"]
    assert [r.getMessage() for r in warnings_seen if "predates run-directory integrity checks" in r.getMessage()]


def test_a_bad_policy_json_is_a_usage_error(npz, run_copy):
    def write_policy(thresholds):  # a hand edit, with run.json's hash updated so the policy itself is read
        (run_copy / R.POLICY_FILE).write_text(json.dumps({"type": "MaxSoftmax", "thresholds": thresholds}))
        run = json.loads((run_copy / R.RUN_FILE).read_text())
        if "sha256" in run:
            run["sha256"][R.POLICY_FILE] = R.file_sha256(run_copy / R.POLICY_FILE)
        (run_copy / R.RUN_FILE).write_text(json.dumps(run))

    write_policy([0.5, 0.2, 0.3])
    with pytest.raises(UsageError, match=r"policy\.json: MaxSoftmax: got 3 thresholds for 2 early exits"):
        evaluate_run(run_copy, npz, quiet=True)
    write_policy([0.5, "high"])
    with pytest.raises(UsageError, match=r"policy\.json: MaxSoftmax: threshold 'high' is not a number"):
        evaluate_run(run_copy, npz, quiet=True)


# -- the data's content ------------------------------------------------------------------------------
def test_reordered_data_is_flagged_by_evaluate(npz, complete_run, tmp_path, warnings_seen):
    x, y = _arrays()
    perm = np.random.default_rng(1).permutation(N)
    np.savez(tmp_path / "reordered.npz", x=x[perm], y=y[perm])  # same classes, same count, other order
    recorded = json.loads((complete_run / R.RUN_FILE).read_text())["data"].get("fingerprint", "(none)")
    assert evaluate_run(complete_run, npz, quiet=True).get("data_matches_run") is True
    assert not warnings_seen
    report = evaluate_run(complete_run, tmp_path / "reordered.npz", quiet=True)
    assert report.get("data_matches_run") is False
    got = R.dataset_fingerprint(D.load_images(tmp_path / "reordered.npz"))
    msgs = [r.getMessage() for r in warnings_seen]
    assert len(msgs) == 1 and got[:16] in msgs[0] and recorded[:16] in msgs[0], msgs
    assert "the test split is not the one held out in training" in msgs[0]


def test_the_feature_cache_is_not_reused_after_a_middle_label_change(npz, tmp_path):
    out = tmp_path / "run"
    run_experiment(_spec(npz, out))
    train = D.split_indices(N, 0.15, 0.15, 0)["train"]
    x, y = _arrays()
    middle = train[16:-16]  # outside the first and last batch, which the cache's own check hashes
    y[middle] = (y[middle] + 1) % 3
    np.savez(tmp_path / "relabelled.npz", x=x, y=y)
    run_experiment(_spec(tmp_path / "relabelled.npz", out))
    caches = [p for p in (out / "cache" / "train").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(caches) == 2  # a second cache was built for the changed data, not the stale one read
    keys = {json.loads((p / "meta.json").read_text())["fingerprint"]["data"].get("cache_key") for p in caches}
    assert len(keys) == 2 and None not in keys


def test_the_dataset_fingerprint_covers_pixels_labels_and_order(tmp_path):
    x, y = _arrays()
    base = D.load_images(_save(tmp_path / "a.npz", x, y))
    fp = R.dataset_fingerprint(base)
    assert R.dataset_fingerprint(D.load_images(_save(tmp_path / "moved.npz", x, y))) == fp  # location-free
    x2 = x.copy()
    x2[N // 2, 4, 4] ^= 1
    y2 = y.copy()
    y2[N // 2] = (y2[N // 2] + 1) % 3
    for other in ((x2, y), (x, y2), (x[::-1], y[::-1])):
        assert R.dataset_fingerprint(D.load_images(_save(tmp_path / "b.npz", *other))) != fp
    # an ImageFolder: each file's relative path and bytes
    from PIL import Image

    root = tmp_path / "folder"
    for k, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(x[3 * k + i]).save(root / name / f"{i}.png")
    fp_folder = R.dataset_fingerprint(D.load_images(root))
    shutil.copytree(root, tmp_path / "copy")
    assert R.dataset_fingerprint(D.load_images(tmp_path / "copy")) == fp_folder
    Image.fromarray(x[7]).save(root / "b" / "1.png")
    assert R.dataset_fingerprint(D.load_images(root)) != fp_folder


def _save(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=np.ascontiguousarray(x), y=np.ascontiguousarray(y))
    return path
