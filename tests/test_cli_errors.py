"""``slvit-fast`` turns the errors a user fixes by hand into one stderr line and exit code 2 (cli.main):
usage mistakes, a checkpoint_dir written for another model (CheckpointMismatchError names the file and
the field), a damaged feature cache (FeatureCacheError names the folder, the file and how to rebuild).
A traceback would bury the message under library frames (review 10 found both printed as tracebacks)."""

from __future__ import annotations

import pytest

from slvit_fast import cli
from slvit_fast.errors import CheckpointMismatchError
from slvit_fast.training.feature_cache import FeatureCacheError


@pytest.mark.parametrize("error", [
    CheckpointMismatchError("/run/ckpt/training_state.pt: activation: checkpoint 'gelu' vs model 'relu'"),
    FeatureCacheError("feature cache /run/cache/train/ab12: feat0.npy is damaged (checksum); delete the folder"),
], ids=["checkpoint", "feature-cache"])
def test_file_errors_are_one_line_and_exit_2(error, monkeypatch, capsys):
    def train(args):
        raise error

    monkeypatch.setattr(cli, "_cmd_train", train)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"slvit-fast train: error: {error}"]


def test_other_errors_still_raise(monkeypatch):
    """Only the errors a user can fix are shortened: a bug keeps its traceback."""
    def train(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_train", train)
    with pytest.raises(KeyError):
        cli.main(["train"])
