"""Run by torchrun in tests/test_training_ddp.py: train the tiny network's exits on 2 CPU ranks (gloo)."""

import sys

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from training_fixtures import quadrant_task, tiny_net
from slvit_fast.training import train_exits


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    data = quadrant_task(64)
    sampler = DistributedSampler(data, shuffle=False)
    net = tiny_net()
    train_exits(net, DataLoader(data, batch_size=8, sampler=sampler), epochs=2, lr=2e-3, checkpoint_dir=out_dir,
                progress=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
