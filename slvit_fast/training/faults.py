"""Test hook: stop the process at a named point inside a checkpoint write, so a test can kill it there.

``SLVIT_FAST_TEST_CKPT_PAUSE=<point>[@<epoch>]`` makes the writer print ``SLVIT_FAST_CKPT_PAUSE <point>``
on stdout and sleep when it reaches ``<point>`` (at the given epoch, or the first time); the test then
sends SIGKILL. Unset (always, outside tests) it costs one dictionary lookup per point.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "SLVIT_FAST_TEST_CKPT_PAUSE"

# In write order. "begin": nothing written yet for this epoch; "state-partial": half of the new training
# state's temporary file written; "state-written": all of it, not yet renamed; "committed": renamed (the
# commit point); "exits-written": last.safetensors' temporary file written; "exported": last.safetensors
# replaced; "history-written": history.json/csv replaced; "best-written": best.safetensors' temporary
# file written at the end of the run.
POINTS = ("begin", "state-partial", "state-written", "committed", "exits-written", "exported", "history-written",
          "best-written")


def pause_point(point: str, epoch: int) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{ENV}={spec!r}: unknown point {name!r}; points: {POINTS}")
    if name != point or (at and int(at) != epoch):
        return
    # one write(2) of one short line: atomic on a pipe, so it cannot interleave with other output
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"SLVIT_FAST_CKPT_PAUSE {point}\n".encode())
    while True:  # until killed
        time.sleep(60)
