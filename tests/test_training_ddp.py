"""Two CPU processes under torchrun (gloo, loopback) train the exits exactly as one process does."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import load_exits, train_exits

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "ddp_train_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Only rank 0 writes checkpoints: one set of files, no temporary leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "history.csv", "history.json",
                                                          "last.safetensors", "training_state.pt"]

    single = tiny_net()
    train_exits(single, loader(quadrant_task(64), batch_size=16), epochs=2, lr=2e-3, progress=False)
    distributed = tiny_net(seed=3)
    load_exits(distributed, tmp_path / "last.safetensors")
    moved = False
    # Gradients agree to float rounding (sums in another order); Adam divides by sqrt(v), which turns
    # rounding in near-zero gradients into up to a few percent of one step, so allow 10% of one step.
    step = 2e-3
    for k, v in single.exits.state_dict().items():
        torch.testing.assert_close(distributed.exits.state_dict()[k], v, rtol=1e-3, atol=0.1 * step)
        moved |= not torch.equal(v, tiny_net().exits.state_dict()[k])
    assert moved  # training changed the weights, so the comparison means something
