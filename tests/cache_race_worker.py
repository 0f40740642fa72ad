"""Run by tests/test_feature_cache_concurrency.py: train from a feature cache folder shared with another
process that starts at the same moment, then train live on the same data; print both histories as JSON.

argv: cache_dir data_seed go_file. The loader is slow (a sleep per batch) so the two cache builds overlap.
"""

import json
import sys
import time
from pathlib import Path

import torch

from training_fixtures import loader, quadrant_task, tiny_net
from slvit_fast.training import FeatureCache, train_exits

BUILT = []  # splits this process built (the other process may have built the rest)
_build = FeatureCache.build.__func__


def _counting_build(cls, net, loader, directory, *args, **kwargs):
    BUILT.append(Path(directory).parent.name)
    return _build(cls, net, loader, directory, *args, **kwargs)


FeatureCache.build = classmethod(_counting_build)


class SlowLoader:
    def __init__(self, inner, delay=0.05):
        self.inner, self.delay = inner, delay
        self.dataset, self.batch_size = inner.dataset, inner.batch_size

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            time.sleep(self.delay)
            yield batch


def main(cache_dir: str, data_seed: int, go_file: str) -> None:
    torch.set_num_threads(1)
    train = SlowLoader(loader(quadrant_task(48, seed=data_seed), batch_size=8))
    val = SlowLoader(loader(quadrant_task(16, seed=100 + data_seed), batch_size=8))
    print("ready", flush=True)
    while not Path(go_file).exists():
        time.sleep(0.005)
    kw = dict(epochs=2, lr=2e-3, progress=False)
    cached = train_exits(tiny_net(), train, val, cache_dir=cache_dir, shuffle_cache=False, **kw)
    live = train_exits(tiny_net(), train, val, **kw)
    series = lambda h: [h.exit_series(i, k) for i in range(2) for k in ("train_loss", "val_loss")]  # noqa: E731
    print(json.dumps({"cached": series(cached), "live": series(live), "built": BUILT}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
