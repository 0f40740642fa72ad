"""The roofline model: fused kernels' FLOPs add up to the exit's, and beat eager on launches and bytes."""

import pytest
import torch

import slvit_fast as sf
from slvit_fast.accounting import slvit_flops
from slvit_fast.roofline import H100, exit_roofline


@pytest.mark.parametrize("preset", ["resnet152-b1", "inceptionv3-b1-cifar100", "audiocsrnet-av1"])
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (64, torch.bfloat16)])
def test_roofline_is_consistent(preset, batch, dtype):
    c = sf.SLViTExit.from_preset(preset).config
    r = exit_roofline(c, batch, dtype)
    assert sum(k["flops"] for k in r["kernels"]) == pytest.approx(batch * slvit_flops(c), rel=1e-9)
    assert r["fused_launches"] == 3
    assert 15 <= r["eager_launches"] <= 40  # eager PyTorch runs ~25 kernels for this exit
    # The features are read at least once by both; eager moves every intermediate through HBM too.
    features = batch * c.in_channels * c.feature_size[0] * c.feature_size[1] * torch.tensor([], dtype=dtype).element_size()
    assert features <= r["fused_bytes"] < r["eager_bytes"]
    for k in r["kernels"]:
        assert k["bound_s"] >= k["min_bytes"] / H100["hbm_bytes_per_s"]


@pytest.mark.parametrize("preset", ["resnet152-b1", "audiocsrnet-av1"])
@pytest.mark.parametrize("batch,dtype", [(1, torch.float32), (64, torch.bfloat16)])
def test_cuda_graph_anchors_sit_between_eager_and_fused(preset, batch, dtype):
    from slvit_fast.roofline import GRAPH_LAUNCH_S, GRAPH_NODE_S, LAUNCH_OVERHEAD_S, eager_ops

    c = sf.SLViTExit.from_preset(preset).config
    r = exit_roofline(c, batch, dtype)
    gemms = sum(op.gemm for op in eager_ops(c, batch, dtype))
    # replaying eager's kernels from a graph removes exactly the launch gaps, adds the graph's costs
    assert r["eager_estimate_s"] - r["graph_eager_estimate_s"] == pytest.approx(
        r["eager_launches"] * (LAUNCH_OVERHEAD_S - GRAPH_NODE_S) - GRAPH_LAUNCH_S, rel=1e-6)
    # inductor keeps one kernel per matmul and fuses the ops between them: fewer kernels, less traffic
    assert gemms < r["reduce_overhead_launches"] < r["eager_launches"]
    assert r["fused_bytes"] <= r["reduce_overhead_bytes"] <= r["eager_bytes"]
    assert r["fused_bound_s"] < r["reduce_overhead_estimate_s"] <= r["graph_eager_estimate_s"] < r["eager_estimate_s"]
    assert r["reduce_overhead_estimate_s"] >= GRAPH_LAUNCH_S + r["reduce_overhead_launches"] * GRAPH_NODE_S


def test_fusion_model_reads_inputs_from_outside_and_writes_only_what_is_used_later():
    from slvit_fast.roofline import _fused_kernels, _Op

    ops = [
        _Op("mm", True, 100.0, [("x", 8), ("w1", 4)], [("a", 16)]),
        _Op("add", False, 0.0, [("a", 16), ("b", 2)], [("t1", 16)]),  # t1 stays inside the fused run
        _Op("gelu", False, 0.0, [("t1", 16)], [("t2", 16)]),
        _Op("mm", True, 50.0, [("t2", 16), ("w2", 4)], [("y", 8)]),
        _Op("mul", False, 0.0, [("y", 8)], [("out", 8)]),  # the final output is written
    ]
    assert _fused_kernels(ops) == [(100.0, 28.0), (0.0, 16 + 2 + 16.0), (50.0, 28.0), (0.0, 16.0)]
