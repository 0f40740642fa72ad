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
    assert len(err) == 1 and err[0].startswith(f"slvit-fast train: error: {error}"), err
    if isinstance(error, FeatureCacheError):  # the library's advice names train_exits' option; the CLI has none
        assert "delete it and rerun to rebuild it" in err[0]


def test_a_multi_line_mismatch_is_one_line(monkeypatch, capsys):
    """A mismatch of several exit fields is one message line per field: joined, still one stderr line."""
    def train(args):
        raise CheckpointMismatchError("ckpt/training_state.pt: the exits differ:\n  b1: activation: 'gelu' vs "
                                      "'relu'\n  b2: num_heads: 4 vs 2")

    monkeypatch.setattr(cli, "_cmd_train", train)
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["slvit-fast train: error: ckpt/training_state.pt: the exits differ:; b1: activation: 'gelu' vs "
                   "'relu'; b2: num_heads: 4 vs 2"]


def test_other_errors_still_raise(monkeypatch):
    """Only the errors a user can fix are shortened: a bug keeps its traceback."""
    def train(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "_cmd_train", train)
    with pytest.raises(KeyError):
        cli.main(["train"])
