"""Second-order gradients through the fused backends raise instead of coming back as None.

Their backward ops had no autograd kernel, so ``create_graph=True`` followed by a second backward
treated the fused backward as a constant: the second-order gradient of the patch-embedding weight
came back None with only a UserWarning. First-order gradients under ``create_graph=True`` must keep
working (and equal the reference's); the second differentiation must raise, naming the op.
"""

import pytest
import torch

from slvit_fast import SLViTConfig, SLViTExit
from slvit_fast.ops import cpp_ops

CFG = SLViTConfig(in_channels=3, feature_size=(6, 10), patch_size=2, embed_dim=12, num_heads=3, key_dim=5,
                  mlp_dim=33, head_hidden=17, num_outputs=7)


@pytest.mark.parametrize("backend", ["cpu", "cuda-emu"])
def test_double_backward_raises_and_first_order_still_matches(backend):
    kind = "cpu" if backend == "cpu" else "emu"
    if cpp_ops.ensure_registered(kind) is not None:
        pytest.skip(f"extension {kind!r} not built")
    torch.manual_seed(0)
    ref = SLViTExit(CFG, backend="torch")
    ours = SLViTExit(CFG, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 6, 10)
    go = torch.randn(3, 7)
    grads = []
    for m in (ref, ours):
        xx = x.clone().requires_grad_()
        gx, = torch.autograd.grad((m(xx) * go).sum(), xx, create_graph=True)
        grads.append(gx)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    # the reference has a real second derivative here, so None/zero would be a wrong answer
    second_ref, = torch.autograd.grad(grads[0].pow(2).sum(), ref.patch_embed.weight)
    assert second_ref.abs().max() > 0
    with pytest.raises(NotImplementedError, match=r"exit_backward.*second-order"):
        torch.autograd.grad(grads[1].pow(2).sum(), ours.patch_embed.weight)
