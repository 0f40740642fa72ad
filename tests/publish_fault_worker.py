"""Run by tests/test_publish_faults.py: one ``run_experiment`` (a RunSpec given as JSON), SIGKILLed at a
chosen point of publishing the run into its --out.

``python publish_fault_worker.py SPEC_JSON POINT`` where POINT is

* ``none``: run to the end (the fault-free reference);
* a file name (``.publishing.json``, ``exits.safetensors``, ``run.json``, ...): killed just before the
  ``os.replace`` that puts that file into --out (``.publishing.json`` is the commit record itself);
* ``cleanup``: killed after every file was moved in, before the staging folder and the record are removed.

A process that reaches the end without meeting its point exits with 3, so the test can tell "killed where
asked" (-SIGKILL) from "the point does not exist".
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from slvit_fast.workflow import RunSpec, run_experiment
from slvit_fast.workflow import rundir as R


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(spec_json: str, point: str) -> None:
    torch.set_num_threads(1)
    spec = RunSpec(**json.loads(spec_json))
    if point != "none":
        real_publish, real_replace, real_rmtree = R.publish, os.replace, R.shutil.rmtree

        def replace(src, dst):
            if Path(dst).name == point:
                _die()
            return real_replace(src, dst)

        def rmtree(path, *args, **kwargs):
            if point == "cleanup" and Path(path).name.startswith(R.STAGE_PREFIX):
                _die()
            return real_rmtree(path, *args, **kwargs)

        def publish(*args, **kwargs):  # the kill points only count inside publishing (atomic_write renames too)
            os.replace, R.shutil.rmtree = replace, rmtree
            try:
                return real_publish(*args, **kwargs)
            finally:
                os.replace, R.shutil.rmtree = real_replace, real_rmtree

        R.publish = publish
    run_experiment(spec)
    if point != "none":
        os._exit(3)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
