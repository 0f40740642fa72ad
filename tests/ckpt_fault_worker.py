"""Run by tests/test_checkpoint_faults.py: train the tiny network with checkpoints, to be killed or resumed.

``python ckpt_fault_worker.py run DIR [DIR ...]`` trains (or resumes) in each folder in turn and prints one
JSON line per folder: a digest of every exit tensor after the run, of the exported files' tensors and
the loss history.

``python ckpt_fault_worker.py kill ROOT POINT[@EPOCH] ...`` starts one training
process per pause point (folder ROOT/POINT, SLVIT_FAST_TEST_CKPT_PAUSE=POINT@EPOCH). Each child prints
``PID <point> <pid>``; when it reaches its point it prints ``SLVIT_FAST_CKPT_PAUSE <point>`` and waits
for the test to SIGKILL it. The parent finally prints ``EXIT <point> <signal>`` for every child.

The loader shuffles (global RNG), so resuming must also restore the random number state.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import train_exits
from slvit_fast.training.faults import ENV

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


def kill_children(root: str, specs: list[str]) -> None:
    # One fresh process per pause point (not os.fork of this process: a fork taken while torch's
    # thread pools hold a lock can leave the child hung before it reaches its point).
    children = {}
    for spec in specs:
        point = spec.split("@")[0]
        env = dict(os.environ, **{ENV: spec})
        children[point] = subprocess.Popen([sys.executable, __file__, "child", os.path.join(root, point), point],
                                           env=env)
    for point, proc in children.items():
        rc = proc.wait()
        print(f"EXIT {point} {-rc if rc < 0 else -1}", flush=True)


def child(out_dir: str, point: str) -> None:
    """Train until the pause point, where the test kills this process."""
    print(f"PID {point} {os.getpid()}", flush=True)
    run(out_dir)
    print(f"NOPAUSE {point}", flush=True)  # never reached the point: the test fails on this
    sys.stdout.flush()
    os._exit(3)


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill_children(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        for d in sys.argv[2:]:
            print(json.dumps(run(d)), flush=True)
