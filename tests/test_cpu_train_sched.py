"""The fused CPU training path's schedule is deterministic (csrc/cpu/train_fused_path.cpp, "work schedule").

The batch is cut into chunks and the chunks into accumulation groups from the batch size and the token
count only; workers claim chunks / groups dynamically and every group sums its parameter gradients in
its own slot, reduced in group order. So the output, dx, dextra and every parameter gradient must be
the SAME BITS for 1, 2 and 3 threads and between two runs - not merely close (the values against the
reference are tests/test_cpu_train*.py's job). Thread counts change in-process (torch.set_num_threads),
as in tests/cpu_train_splits.py.
"""

from __future__ import annotations

import pytest
import torch

from cpu_train_splits import _has_avx512
from kernel_cases import awkward_config, randomize_
from slvit_fast import SLViTConfig, SLViTExit, reference
from slvit_fast.backends import cpu_backend
from slvit_fast.exit_presets import PRESETS
from slvit_fast.ops import cpp_ops

reason = cpu_backend.BACKEND.unavailable_reason(torch.empty(1, 1, 1, 1))
has_avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
pytestmark = [
    pytest.mark.skipif(reason is not None, reason=f"cpu backend not built: {reason}"),
    pytest.mark.skipif(not has_avx2, reason="the fused CPU training path needs AVX2+FMA"),
]


@pytest.fixture(params=["avx2", "avx512"])
def fused_path(request, monkeypatch):
    """The fused training path on one ISA's tiles, default schedule and chunking."""
    if request.param == "avx512" and not _has_avx512():
        pytest.skip("this CPU (or OS) has no AVX-512F/DQ/BW/VL")
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_FUSED", "1")
    monkeypatch.setenv("SLVIT_FAST_CPU_ISA", request.param)
    for var in ("SLVIT_FAST_CPU_TRAIN_CHUNK", "SLVIT_FAST_CPU_TRAIN_SCHED", "SLVIT_FAST_CPU_TRAIN_KERNELS"):
        monkeypatch.delenv(var, raising=False)
    n = torch.get_num_threads()
    yield request.param
    torch.set_num_threads(n)


def step(m, x, extra, grad_out, threads):
    """Output, dx (, dextra) and parameter gradients of one training step on `threads` threads."""
    torch.set_num_threads(threads)
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    ei = None if extra is None else extra.clone().requires_grad_(True)
    out = m(xi, ei)
    out.backward(grad_out)
    named = {"output": out.detach(), "dx": xi.grad}
    if ei is not None:
        named["dextra"] = ei.grad
    named.update({f"grad {n}": p.grad.clone() for n, p in m.named_parameters()})
    return named


def assert_same_bits(a, b, what):
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if not torch.equal(x, y):
            diff = (x - y).abs().max().item()
            pytest.fail(f"{name} differs between {what} (max |diff| {diff:.3g}): the schedule is not deterministic")


def case(config, batch, seed=0):
    m = randomize_(SLViTExit(config, backend="cpu"), seed).train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, config.in_channels, *config.feature_size, generator=g)
    extra = torch.randn(batch, config.extra_tokens, config.extra_dim, generator=g) if config.extra_tokens else None
    grad_out = torch.randn(batch, config.num_outputs, generator=g)
    return m, x, extra, grad_out


def test_paper_preset_batch_64_same_bits_for_1_2_3_threads_and_two_runs(fused_path):
    m, x, extra, grad_out = case(SLViTConfig(**PRESETS["resnet152-b1"].slvit_kwargs()), 64)
    one = step(m, x, extra, grad_out, 1)
    two = step(m, x, extra, grad_out, 2)
    assert_same_bits(two, one, "1 and 2 threads")
    assert_same_bits(step(m, x, extra, grad_out, 2), two, "two runs on 2 threads")
    assert_same_bits(step(m, x, extra, grad_out, 3), one, "1 and 3 threads")


@pytest.mark.parametrize("chunk", [None, "1"], ids=["chunk-auto", "chunk1"])
def test_extra_tokens_channels_last_and_many_groups(chunk, fused_path, monkeypatch):
    """Extra tokens (their gradients go through the slots too), channels_last x; forced one-sample
    chunks (groups of 5 chunks)."""
    if chunk:
        monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_CHUNK", chunk)
    m, x, extra, grad_out = case(awkward_config("grid16x9-h24-extra"), 40)
    x = x.contiguous(memory_format=torch.channels_last)
    one = step(m, x, extra, grad_out, 1)
    assert_same_bits(step(m, x, extra, grad_out, 2), one, "1 and 2 threads")
    assert_same_bits(step(m, x, extra, grad_out, 3), one, "1 and 3 threads")


def test_dropout_two_layers_same_bits(fused_path):
    """Dropout masks (counter-based, per element of the whole batch) and 2 layers, through the op."""
    c = awkward_config("N49-nores-relu", num_layers=2)
    m, x, _, grad_out = case(c, 24)
    params = [p.detach() for p in reference.module_params(m)]
    cfg = cpp_ops.config_ints(c) + [round(0.1 * 2**32), round(0.2 * 2**32), round(0.3 * 2**32), 1234]

    def run(threads):
        torch.set_num_threads(threads)
        r = torch.ops.slvit_fast.cpu_exit_forward(x, None, params, cfg, c.ln_eps, True)
        g = torch.ops.slvit_fast.cpu_exit_backward(grad_out, x, None, params, r[1:], cfg, c.ln_eps, True)
        return {"output": r[0], "dx": g[0], **{f"grad {i}": t for i, t in enumerate(g[2:])}}

    one = run(1)
    assert_same_bits(run(2), one, "1 and 2 threads")
    assert_same_bits(run(2), run(2), "two runs on 2 threads")


def test_bad_schedule_value_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_FUSED", "1")
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_SCHED", "dynamc")
    m, x, extra, grad_out = case(awkward_config("N25-h1"), 3)
    with pytest.raises(RuntimeError, match="SLVIT_FAST_CPU_TRAIN_SCHED='dynamc'"):
        m(x, extra)


@pytest.mark.parametrize("sched", ["static", "equal"])
def test_old_schedule_knobs_give_the_same_values(sched, fused_path, monkeypatch):
    """SLVIT_FAST_CPU_TRAIN_SCHED=static (the old split) and =equal (dynamic claiming of equal groups, the
    partition before the decreasing group sizes), kept for old-vs-new timings: other summation order,
    same values to float32 rounding; "equal" is deterministic across thread counts as well."""
    m, x, extra, grad_out = case(awkward_config("grid16x9-h24-extra"), 19)
    dynamic = step(m, x, extra, grad_out, 2)
    monkeypatch.setenv("SLVIT_FAST_CPU_TRAIN_SCHED", sched)
    other = step(m, x, extra, grad_out, 2)
    for name, ref in dynamic.items():
        torch.testing.assert_close(other[name], ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6, msg=name)
    if sched == "equal":
        assert_same_bits(step(m, x, extra, grad_out, 1), other, "1 and 2 threads (equal groups)")
        # the partitions differ (19 samples: 2, 2, 3, 2, 2, 3, 2, 3 equal vs 4, 3, 3, 2, 2, 2, 2, 1 decreasing),
        # so the gradients' summation order does too: the knob really selects the other partition
        assert any(not torch.equal(other[n], dynamic[n]) for n in dynamic if n.startswith("grad"))


def test_every_thread_takes_part_in_the_forward_and_the_backward(fused_path):
    """The same bits for any thread count could also come from a path that silently runs on one thread
    (a schedule built while the calling thread was held single-threaded did exactly that): with 2 threads
    both must run chunks of the forward and of the backward. Groups are claimed dynamically, so one
    thread might - on a loaded machine - take them all once; a step is retried before failing."""
    m = randomize_(SLViTExit(awkward_config("N49-nores-relu"), backend="cpu")).train()
    x = torch.randn(64, 8, 28, 28)
    torch.set_num_threads(2)
    seen = {}
    for _ in range(4):
        m.zero_grad(set_to_none=True)
        with torch.autograd.profiler.profile() as prof:
            m(x).sum().backward()
        seen = {"forward": set(), "backward": set()}
        for e in prof.function_events:
            if e.name.startswith("slvit_cpu::fwd_"):
                seen["forward"].add(e.thread)
            elif e.name.startswith("slvit_cpu::bwd_"):
                seen["backward"].add(e.thread)
        if all(len(t) == 2 for t in seen.values()):
            return
    pytest.fail(f"threads that ran chunks with 2 threads set: { {k: len(v) for k, v in seen.items()} }")
