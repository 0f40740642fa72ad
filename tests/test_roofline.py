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
