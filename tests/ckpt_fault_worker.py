"""Run by tests/test_checkpoint_faults.py: train the tiny network with checkpoints, to be killed or resumed.

``python ckpt_fault_worker.py run DIR [DIR ...]`` trains (or resumes) in each folder in turn and prints one
JSON line per folder: a digest of every exit tensor after the run, of the exported files' tensors and
the loss history.

``python ckpt_fault_worker.py child DIR`` (with SLVIT_FAST_TEST_CKPT_PAUSE=POINT@EPOCH) trains in DIR until
the pause point, prints ``SLVIT_FAST_CKPT_PAUSE <point>`` and sleeps there until the test SIGKILLs it; the
test starts one such process per point, each with its own stdout pipe.

The loader shuffles (global RNG), so resuming must also restore the random number state.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import train_exits

EPOCHS = 3


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:20]


def run(out_dir: str) -> dict:
    torch.set_num_threads(1)
    net = tiny_net()
    hist = train_exits(net, loader(quadrant_task(32), batch_size=8, shuffle=True), loader(quadrant_task(16, seed=1)),
                       epochs=EPOCHS, lr=2e-3, checkpoint_dir=out_dir, progress=False)
    # tensors, not bytes: safetensors writes its metadata map in a per-process order
    files = {name: {k: _digest(v) for k, v in load_file(str(Path(out_dir) / name)).items()}
             for name in ("last.safetensors", "best.safetensors")}
    return {"dir": out_dir, "weights": {k: _digest(v) for k, v in net.exits.state_dict().items()}, "files": files,
            "losses": [[r["train_loss"], r["val_loss"]] for e in hist.epochs for r in e["exits"]],
            "epochs": [e["epoch"] for e in hist.epochs]}


def child(out_dir: str) -> None:
    """Train until the pause point (SLVIT_FAST_TEST_CKPT_PAUSE), where the test kills this process."""
    run(out_dir)
    os.write(1, b"NOPAUSE\n")  # never reached the point: the test fails on this
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1] == "child":
        child(sys.argv[2])
    else:
        for d in sys.argv[2:]:
            print(json.dumps(run(d)), flush=True)
