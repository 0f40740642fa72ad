"""Training output (issue 13 item 5): summary lines through logging, tqdm only on a terminal, callbacks,
history.json / history.csv in the checkpoint folder."""

import csv
import json
import logging
import math

import pytest
import torch

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import train_exits
from slvit_fast.training import output as training_output

SHORT = dict(epochs=2, lr=2e-3)


def _stopping_run(**kw):
    """Validation labels are noise: exit 0 (the SL-ViT) stops early long before the 40 epochs end."""
    noise = quadrant_task(32, seed=3)
    noise.tensors = (noise.tensors[0], torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(9)))
    return train_exits(tiny_net(), loader(quadrant_task(32)), loader(noise), epochs=40, lr=1e-2, **kw)


def test_one_summary_line_per_epoch_through_logging_even_without_progress(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="slvit_fast"):
        hist = _stopping_run(progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "slvit_fast.training" and r.getMessage().startswith("epoch ")]
    assert len(lines) == len(hist.epochs) and lines[0].startswith("epoch 1/40 (")
    stop = next(e["epoch"] for e in hist.epochs if e["exits"][0]["stopped"])
    assert stop < len(hist.epochs) - 1  # exit 0 stopped while exit 1 went on
    assert "exit0 loss" in lines[stop] and "(stops: no validation improvement)" in lines[stop]
    for line in lines[stop + 1:]:
        assert f"exit0 stopped at epoch {stop + 1};" in line and "exit1 loss" in line
    assert not any("loss 0.0000" in line or "loss nan" in line for line in lines)
    assert math.isnan(hist.epochs[-1]["exits"][0]["train_loss"])  # not trained: no made-up 0.0 either
    assert any("exit0 (2) stopped early after epoch" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # progress=False: nothing printed


def test_no_progress_bar_when_stderr_is_not_a_terminal(capsys):
    train_exits(tiny_net(), loader(quadrant_task(32)), loader(quadrant_task(16, seed=1)), progress=True, **SHORT)
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err, err[:500]


def test_progress_bar_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(training_output, "_stderr_is_tty", lambda: True)
    train_exits(tiny_net(), loader(quadrant_task(32)), loader(quadrant_task(16, seed=1)), progress=True, **SHORT)
    assert "epoch 1/2" in capsys.readouterr().err


def test_summary_printed_when_no_logging_is_configured(capsys, monkeypatch):
    monkeypatch.setattr(logging.getLogger("slvit_fast.training"), "propagate", False)  # as if nothing listens
    train_exits(tiny_net(), loader(quadrant_task(32)), loader(quadrant_task(16, seed=1)), progress=True, **SHORT)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in out] == ["epoch 1/2", "epoch 2/2"]


class Recorder:
    def __init__(self):
        self.calls = []

    def on_epoch_end(self, epoch, history):
        self.calls.append(("epoch_end", epoch, len(history.epochs)))

    def on_exit_stopped(self, exit_index, epoch):
        self.calls.append(("stopped", exit_index, epoch))


def test_callbacks_objects_and_dicts():
    rec, stops, legacy = Recorder(), [], []
    hist = _stopping_run(progress=False, callbacks=[rec, {"on_exit_stopped": lambda i, e: stops.append((i, e))}],
                         on_epoch_end=lambda e, h: legacy.append(e))
    n = len(hist.epochs)
    first_stop = {i: next(e["epoch"] for e in hist.epochs if e["exits"][i]["stopped"]) for i in range(2)
                  if hist.epochs[-1]["exits"][i]["stopped"]}
    assert first_stop  # something stopped
    assert [c for c in rec.calls if c[0] == "epoch_end"] == [("epoch_end", e, e + 1) for e in range(n)]
    assert [c[1:] for c in rec.calls if c[0] == "stopped"] == sorted(first_stop.items(), key=lambda t: (t[1], t[0]))
    assert stops == [c[1:] for c in rec.calls if c[0] == "stopped"]
    assert legacy == list(range(n))
    for call in rec.calls:  # a stop is reported before the end of the epoch it happened in
        if call[0] == "stopped":
            assert rec.calls.index(call) < rec.calls.index(("epoch_end", call[2], call[2] + 1))


def test_bad_callbacks_are_clear_errors():
    data = loader(quadrant_task(8))
    with pytest.raises(ValueError, match=r"callbacks\[0\]: unknown keys \['on_epoch_begin'\]"):
        train_exits(tiny_net(), data, epochs=1, progress=False, callbacks=[{"on_epoch_begin": print}])
    with pytest.raises(TypeError, match=r"callbacks\[1\] \(int\) has none of"):
        train_exits(tiny_net(), data, epochs=1, progress=False, callbacks=[Recorder(), 3])


def test_history_files_written_every_epoch(tmp_path):
    seen = []

    def check(epoch, history):  # the files are current when the callback runs
        seen.append(len(json.loads((tmp_path / "history.json").read_text())["epochs"]))

    hist = train_exits(tiny_net(), loader(quadrant_task(32)), loader(quadrant_task(16, seed=1)), epochs=3, lr=2e-3,
                       progress=False, checkpoint_dir=tmp_path, on_epoch_end=check)
    assert seen == [1, 2, 3]
    data = json.loads((tmp_path / "history.json").read_text())
    assert data["metric_names"] == ["accuracy", "accuracy"]
    assert [e["epoch"] for e in data["epochs"]] == [0, 1, 2]
    for e_file, e in zip(data["epochs"], hist.epochs):
        for r_file, r in zip(e_file["exits"], e["exits"]):
            assert r_file == pytest.approx({k: r[k] for k in r})
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(rows) == 3 * 2 and list(rows[0]) == ["epoch", "exit", "train_loss", "val_loss", "val_metric", "metric",
                                                   "lr", "stopped", "seconds"]
    for row in rows:
        r = hist.epochs[int(row["epoch"])]["exits"][int(row["exit"])]
        assert float(row["train_loss"]) == r["train_loss"] and float(row["val_loss"]) == r["val_loss"]
        assert float(row["val_metric"]) == r["val_metric"] and row["metric"] == "accuracy"
    assert not list(tmp_path.glob(".*.tmp"))


def test_history_json_is_strict_json_with_nan_as_null():
    from slvit_fast.training import History

    rec = {"train_loss": math.nan, "val_loss": 1.5, "val_metric": math.nan, "lr": 1e-3, "stopped": True}
    hist = History(epochs=[{"epoch": 0, "seconds": 0.1, "exits": [rec]}], metric_names=["accuracy"])
    text = hist.to_json()
    assert "NaN" not in text
    assert json.loads(text)["epochs"][0]["exits"][0] == {**rec, "train_loss": None, "val_metric": None}
    assert hist.to_csv().splitlines()[1] == "0,0,nan,1.5,nan,accuracy,0.001,1,0.1"
