"""Shared cases and checks for every fused backend: the reference (torch) is the specification.

``check_against_reference(backend, config, batch, dtype)`` builds one exit, runs it on ``backend`` and
on the torch reference in the same dtype and in float64, and compares the output and the gradient of
every input (features, extra tokens) and every parameter. Tolerances are *paired*: a backend may err
at most ``factor`` times what the torch reference itself errs in that dtype (vs float64), plus a small
floor relative to the tensor's scale - tight where the reference is exact, loose only where the dtype
forces it.

Scenarios every fused backend runs (tests/test_cpu_backend.py, tests/test_cuda_emu.py, ...):
``check_nan_isolated`` (a NaN in one sample stays in that sample) and ``property_test`` (hypothesis
over random valid configurations, skipped when hypothesis is not installed).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # the property tests skip; everything else here works without it
    hypothesis = None

from slvit_fast import SLViTConfig, SLViTExit

# Small channel counts keep interpreter / emulator runs quick; the token/head geometry is the point.
AWKWARD_CONFIGS: dict[str, dict] = {
    "N25-h1": dict(in_channels=6, feature_size=(10, 10), patch_size=2, embed_dim=32, num_heads=1),
    "N49-h8-kd36": dict(in_channels=4, feature_size=(14, 14), patch_size=2, embed_dim=32, num_heads=8, key_dim=36),
    "N144-h12": dict(in_channels=3, feature_size=(24, 24), patch_size=2, embed_dim=32, num_heads=12),
    "grid16x9-h24-extra": dict(in_channels=4, feature_size=(18, 32), patch_size=2, embed_dim=32, num_heads=24,
                               extra_tokens=2, extra_dim=20),
    "N49-nores-relu": dict(in_channels=8, feature_size=(28, 28), patch_size=4, embed_dim=36, num_heads=12,
                           mlp_residual=False, activation="relu"),
    "nonsquare-patch": dict(in_channels=5, feature_size=(12, 20), patch_size=(3, 4), embed_dim=16, num_heads=2,
                            key_dim=16),
}
SMALL_HIDDEN = dict(mlp_dim=64, head_hidden=40, num_outputs=7)


def awkward_config(name: str, **overrides) -> SLViTConfig:
    return SLViTConfig(**{**SMALL_HIDDEN, **AWKWARD_CONFIGS[name], **overrides})


def randomize_(exit_module: SLViTExit, seed: int = 0, scale: float = 1.0) -> SLViTExit:
    """Give every parameter (LayerNorm affine included) non-trivial values, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in exit_module.named_parameters():
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            std = scale / fan_in**0.5 if p.dim() > 1 else 0.2
            values = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
            if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                values = 1.0 + values
            p.copy_(values.to(p.dtype))
    return exit_module


@dataclass
class Tolerance:
    factor: float  # times the torch reference's own error in this dtype
    floor: float  # relative to the float64 tensor's max |value|


TOLERANCES = {
    torch.float32: Tolerance(factor=8.0, floor=2e-6),
    torch.float16: Tolerance(factor=4.0, floor=2e-3),
    torch.bfloat16: Tolerance(factor=4.0, floor=1.6e-2),
}


def assert_paired_close(name: str, ours: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor,
                        tol: Tolerance) -> None:
    assert ours is not None, f"{name}: backend produced no value/gradient"
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    ours64, low64 = ours.detach().double(), ref_lowp.detach().double()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isfinite(ours64), finite), f"{name}: non-finite values where the reference has none"
    scale = ref64[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (low64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    err = (ours64 - ref64)[finite].abs().max().item() if finite.any() else 0.0
    bound = tol.factor * ref_err + tol.floor * max(scale, 1e-30)
    assert err <= bound, (
        f"{name}: max error {err:.3e} vs float64 exceeds {bound:.3e} "
        f"(torch reference in {ours.dtype} errs {ref_err:.3e}; scale {scale:.3e})"
    )


def _run(module: SLViTExit, x: torch.Tensor, extra, grad_out: torch.Tensor, backward: bool):
    """Forward (+ backward) of ``module``; output and gradients are returned on the CPU for comparison."""
    x = x.detach().clone().requires_grad_(backward)
    extra = None if extra is None else extra.detach().clone().requires_grad_(backward)
    out = module(x, extra)
    grads = {}
    if backward:
        module.zero_grad(set_to_none=True)
        out.backward(grad_out.to(device=out.device, dtype=out.dtype))
        grads["input x"] = x.grad
        if extra is not None:
            grads["input extra"] = extra.grad
        grads.update({n: p.grad for n, p in module.named_parameters()})
    return out.detach().cpu(), {n: None if g is None else g.cpu() for n, g in grads.items()}


def check_against_reference(backend: str, config: SLViTConfig, batch: int, dtype: torch.dtype = torch.float32,
                            *, backward: bool = True, seed: int = 0, channels_last: bool = False,
                            x: torch.Tensor | None = None, tol: Tolerance | None = None,
                            device: str | torch.device = "cpu") -> torch.Tensor:
    """Compare ``backend`` with the torch reference, forward and (optionally) every gradient.

    ``device``: where ``backend`` and the same-dtype torch reference run (e.g. ``"cuda"``; their errors
    are paired on that device, so TF32 matmuls on a GPU are paired with TF32 reference matmuls); the
    float64 reference always runs on the CPU. Returns the backend's output, on the CPU.
    """
    tol = tol or TOLERANCES[dtype]
    base = randomize_(SLViTExit(config, backend="torch").double(), seed).eval()
    ref64 = base
    ref_lowp = copy.deepcopy(base).to(device=device, dtype=dtype)
    ours = copy.deepcopy(base).to(device=device, dtype=dtype)
    ours.backend = backend
    g = torch.Generator().manual_seed(seed + 1)
    H, W = config.feature_size
    if x is None:
        x = torch.randn(batch, config.in_channels, H, W, generator=g, dtype=torch.float64)
    extra = None
    if config.extra_tokens:
        extra = torch.randn(batch, config.extra_tokens, config.extra_dim, generator=g, dtype=torch.float64)
    grad_out = torch.randn(batch, config.num_outputs, generator=g, dtype=torch.float64)

    def inputs(dt, dev="cpu"):
        xi = x.to(device=dev, dtype=dt)
        if channels_last:
            xi = xi.contiguous(memory_format=torch.channels_last)
        return xi, None if extra is None else extra.to(device=dev, dtype=dt)

    out64, grads64 = _run(ref64, *inputs(torch.float64), grad_out, backward)
    out_low, grads_low = _run(ref_lowp, *inputs(dtype, device), grad_out, backward)
    out, grads = _run(ours, *inputs(dtype, device), grad_out, backward)
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected {dtype}"
    assert_paired_close("output", out, out_low, out64, tol)
    for name in grads64:
        assert_paired_close(f"grad {name}", grads[name], grads_low[name], grads64[name], tol)
    return out


def half_dtype_available(backend_dtype: torch.dtype) -> bool:
    """The CPU torch reference must run in the dtype for a paired tolerance."""
    try:
        torch.nn.functional.layer_norm(torch.ones(2, 4, dtype=backend_dtype), (4,))
        torch.ones(2, 2, dtype=backend_dtype) @ torch.ones(2, 2, dtype=backend_dtype)
        return True
    except RuntimeError:
        return False


requires_half = pytest.mark.skipif(not half_dtype_available(torch.float16), reason="no fp16 CPU reference ops")


# -- scenarios shared by the backend test files ----------------------------------------------------------
def check_nan_isolated(backend: str, *, batch: int = 3, nan_at: tuple = (1, 0, 3, 4),
                       device: str | torch.device = "cpu") -> None:
    """A NaN in one sample's features makes that sample's logits NaN and leaves the others equal to the
    reference: no kernel may mix samples (batch-shared workspaces, a head shared across the batch).
    Checked with autograd recording (training path) and without (inference path). ``backend`` runs on
    ``device``, the reference on the CPU."""
    c = awkward_config("N25-h1")
    m = randomize_(SLViTExit(c, backend=backend)).eval().to(device)
    ref = randomize_(SLViTExit(c, backend="torch")).eval()
    x = torch.randn(batch, c.in_channels, *c.feature_size, generator=torch.Generator().manual_seed(3))
    x[nan_at] = float("nan")
    bad = nan_at[0]
    others = [i for i in range(batch) if i != bad]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out, expected = m(x.to(device)).detach().cpu(), ref(x).detach()
        assert torch.isnan(out[bad]).all(), f"grad={grad}: the NaN sample's logits are not all NaN"
        assert torch.isfinite(out[others]).all(), f"grad={grad}: a NaN leaked into another sample"
        torch.testing.assert_close(out[others], expected[others], rtol=1e-5, atol=1e-5)


def _random_config(gh, gw, ph, pw, C, d, heads, kd, extra, residual, act) -> SLViTConfig:
    return SLViTConfig(in_channels=C, feature_size=(gh * ph, gw * pw), patch_size=(ph, pw), embed_dim=d,
                       num_heads=heads, key_dim=kd, mlp_dim=24, head_hidden=12, num_outputs=3, extra_tokens=extra,
                       extra_dim=5 if extra else 0, mlp_residual=residual, activation=act)


def property_test(*, max_examples: int, batch: tuple[int, int] = (1, 4), channels_last: bool = False,
                  max_grid: int = 5, max_patch: int = 3, max_channels: int = 5,
                  dims: tuple = (4, 8, 12, 16, 36, 64), max_heads: int = 6, key_dims: tuple = (None, 4, 8, 20),
                  extras: tuple = (0, 1, 2)):
    """Decorator for ``test(config, batch, channels_last)``: a derandomized hypothesis property test over
    random valid exit configurations (grid, patch, channels, width, heads, key_dim, extra tokens, MLP
    residual, head activation) within the given ranges; ``channels_last=True`` also draws the memory
    format. Backends pass their own (smaller) ranges when a run is slow (the emulator)."""

    def wrap(fn):
        if hypothesis is None:
            return pytest.mark.skip(reason="hypothesis is not installed")(fn)
        configs = st.builds(
            _random_config, gh=st.integers(1, max_grid), gw=st.integers(1, max_grid), ph=st.integers(1, max_patch),
            pw=st.integers(1, max_patch), C=st.integers(1, max_channels), d=st.sampled_from(dims),
            heads=st.integers(1, max_heads), kd=st.sampled_from(key_dims), extra=st.sampled_from(extras),
            residual=st.booleans(), act=st.sampled_from(["gelu", "relu"]))
        given = hypothesis.given(config=configs, batch=st.integers(*batch),
                                 channels_last=st.booleans() if channels_last else st.just(False))
        return hypothesis.settings(max_examples=max_examples, deadline=None, derandomize=True)(given(fn))

    return wrap
