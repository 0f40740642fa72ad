"""The fused training backward's GELU kernels (csrc/cpu: ``slvit_fused::gelu_forward_grad``, AVX2 and
AVX-512, and ``slvit_train::mul_colsum_add``), through the test hook ``_C_cpu._gelu_grad_kernels``.

The backward recomputes fc1's pre-activation h and takes GELU and its derivative from one pass: y =
gelu(h) (the saved hidden activation) and d = gelu'(h), stored over h; the upstream gradient is then
multiplied by d and its column sums (the fc1 bias gradient) are taken in the same pass. Checked against
float64 ``0.5 h (1 + erf(h / sqrt 2))`` and ``Phi(h) + h phi(h)``, on sizes that are not multiples of
the vector widths (8 / 16 lanes: masked tails), with values over the whole range the rational erf
covers (its clamp at |h / sqrt 2| = 4, large |h|, signed zeros), and both instruction sets must give
the same bits (the AVX-512 variant runs the same ops 16 wide, with a true divide).
"""

from __future__ import annotations

import math

import pytest
import torch

from slvit_fast import native
from slvit_fast.backends import cpu_backend

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused training kernels need AVX2"),
]

AVX2, AVX512 = 0, 1


def _hook():
    return native.load("cpu")._gelu_grad_kernels


def _run(x, g, isa, in_place=False):
    """(y, d, dx, colsum) with y and d shaped like x; asserts no float past the results was written."""
    y, d, dx, cs = _hook()(x, g, isa, int(in_place))
    n = x.numel()
    assert (y[n:] == -7.0).all() and (d[n:] == -7.0).all(), "wrote past the last element"
    return y[:n].view(x.shape), d[:n].view(x.shape), dx, cs


def _avx512_ok() -> bool:
    try:
        _hook()(torch.zeros(1, 1), torch.zeros(1, 1), AVX512, 0)
        return True
    except ValueError:
        return False


ISAS = [AVX2, pytest.param(AVX512, marks=pytest.mark.skipif(not _avx512_ok(), reason="no AVX-512 tiles here"))]


def _reference(x: torch.Tensor, g: torch.Tensor):
    h = x.double()
    cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
    d = cdf + h * pdf
    dx = g.double() * d
    return h * cdf, d, dx, dx.sum(0)


def _inputs(rows: int, cols: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 3.0
    flat = x.view(-1)
    special = torch.tensor([0.0, -0.0, 5.657, -5.657, 5.66, -5.66, 9.0, -9.0, 30.0, -30.0, 1e-6, -1e-6])
    k = min(flat.numel(), special.numel())
    flat[:k] = special[:k]  # the erf clamp (|x| / sqrt2 = 4 at 5.657), saturation, zeros
    g = torch.randn(rows, cols, generator=gen)
    return x, g


def _close(got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: torch.Tensor) -> None:
    err = (got.double() - ref).abs()
    bound = rtol * ref.abs() + atol
    worst = int((err - bound).argmax())
    assert (err <= bound).all(), (f"error {err.view(-1)[worst].item():.3e} > bound {bound.view(-1)[worst].item():.3e} "
                                  f"at flat index {worst} (got {got.view(-1)[worst].item()!r}, "
                                  f"want {ref.view(-1)[worst].item()!r})")


# (rows, cols): a single element, every tail length of both vector widths, the preset's 1024 columns
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 9), (2, 15), (5, 17), (4, 31), (7, 33), (13, 1024), (50, 20)])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("in_place", [False, True])
def test_gelu_forward_grad_matches_float64(shape, isa, in_place):
    x, g = _inputs(*shape, seed=shape[0] * 131 + shape[1])
    y, d, dx, cs = _run(x, g, isa, in_place)
    ry, rd, rdx, rcs = _reference(x, g)
    # float32 rounding of the result plus the rational erf's absolute 6.5e-8, which y = 0.5 h (1 + erf)
    # scales by |h| (near-zero y left of -4 have large relative errors: the forward's GELU has them too)
    xa = x.double().abs()
    _close(y, ry, 2e-6, 1e-7 * (1 + xa))
    _close(d, rd, 2e-6, 1e-7 * (1 + xa))
    _close(dx, rdx, 4e-6, 1e-7 * (1 + xa) * g.double().abs())
    # the column sums are the float32 row-order sums of dx itself (exactly what the kernel adds up)
    torch.testing.assert_close(cs, dx.sum(0, dtype=torch.float64).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cs.double(), rcs, rtol=1e-4, atol=1e-5 * shape[0])
    # the derivative really is gelu's: negative on (-3, -1) (left of GELU's minimum at -0.75), above 1 on (1, 3)
    assert (d[(x < -1.0) & (x > -3.0)] < 0).all() and (d[(x > 1.0) & (x < 3.0)] > 1.0).all()


@pytest.mark.parametrize("shape", [(3, 9), (7, 33), (13, 1024)])
def test_isas_give_the_same_bits(shape):
    if not _avx512_ok():
        pytest.skip("no AVX-512 tiles here")
    x, g = _inputs(*shape, seed=7)
    for a, b in zip(_run(x, g, AVX2), _run(x, g, AVX512)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("isa", ISAS)
def test_in_place_gives_the_same_bits(isa):
    """The backward stores gelu'(h) over h (dydx == x): every lane must read x before writing d."""
    x, g = _inputs(7, 37, seed=5)
    for a, b in zip(_run(x, g, isa), _run(x, g, isa, in_place=True)):
        assert torch.equal(a, b)


def test_bad_arguments_raise():
    hook = _hook()
    with pytest.raises(ValueError, match="isa must be 0"):
        hook(torch.zeros(2, 2), torch.zeros(2, 2), 5, 0)
    with pytest.raises(ValueError, match="one 2-D shape"):
        hook(torch.zeros(2, 2), torch.zeros(2, 3), AVX2, 0)
    with pytest.raises(ValueError, match="float32"):
        hook(torch.zeros(2, 2, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64), AVX2, 0)
