"""place_in_huge_pages: the exits' parameters moved into one 2 MiB-page mapping keep their identity,
values, layout, aliasing and every use (inference, training, checkpoints, torch.save, deepcopy), also when
called under inference_mode; prepare_for_inference does it last; the mapping outlives every reference but
the parameters; the report counts only its own mapping. (Review 9 found the inference-mode, aliasing,
whole-mapping torch.save and merged-region cases.)"""

from __future__ import annotations

import copy
import gc
import io
import mmap

import pytest
import torch
from torch import nn

import slvit_fast as sf
from slvit_fast import presets
from slvit_fast.checkpoint import load_exits, save_exits
from slvit_fast.huge_pages import _huge_bytes_of

TINY = sf.SLViTConfig(in_channels=8, feature_size=(8, 12), patch_size=(4, 4), embed_dim=16, num_heads=2,
                      mlp_dim=32, head_hidden=20, num_outputs=5)


def _exit(seed: int = 0) -> sf.SLViTExit:
    torch.manual_seed(seed)
    return sf.SLViTExit(TINY, backend="cpu").eval()


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, TINY.in_channels, *TINY.feature_size, generator=torch.Generator().manual_seed(1))


def test_parameters_keep_identity_values_and_layout_and_share_one_mapping():
    m = _exit()
    before = {n: (id(p), p.detach().clone(), p.stride()) for n, p in m.named_parameters()}
    with torch.inference_mode():
        ref = m(_x())
    report = sf.place_in_huge_pages(m)
    assert report.tensors == len(before) and report.skipped is None
    assert report.bytes >= sum(p.numel() * 4 for p in m.parameters())
    ptrs = []
    for n, p in m.named_parameters():
        pid, value, stride = before[n]
        assert id(p) == pid and torch.equal(p.detach(), value) and p.stride() == stride
        assert p.data_ptr() % 64 == 0 and not p.is_inference()
        ptrs.append(p.untyped_storage().data_ptr())
    assert len(set(ptrs)) == len(ptrs) and max(ptrs) - min(ptrs) < report.bytes  # own storages, one mapping
    gc.collect()  # nothing but the parameters holds the mapping
    with torch.inference_mode():
        assert torch.equal(m(_x()), ref)


def test_channels_last_weights_stay_channels_last():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    w = conv.weight.detach().clone()
    sf.place_in_huge_pages(conv)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and torch.equal(conv.weight.detach(), w)


def test_training_and_an_optimizer_step_work_on_the_moved_parameters():
    m, twin = _exit(), _exit()
    sf.place_in_huge_pages(m)
    for mod in (m, twin):
        mod.train()
        opt = torch.optim.SGD(mod.parameters(), lr=0.1)
        mod(_x()).square().sum().backward()
        opt.step()
    for (n, a), (_, b) in zip(m.named_parameters(), twin.named_parameters()):
        assert torch.equal(a.detach(), b.detach()), n


def test_checkpoints_and_deepcopy_of_a_network_whose_exits_were_moved(tmp_path):
    torch.manual_seed(0)
    net = presets.build("resnet18", input_size=64).eval()
    report = sf.prepare_for_inference(net)
    assert report.huge_pages is not None and report.huge_pages.tensors == sum(1 for _ in net.exits.parameters())
    assert "2 MiB pages" in str(report)
    path = tmp_path / "exits.safetensors"
    save_exits(net, path)  # the exits share one storage now: each is saved as its own tensor
    torch.manual_seed(1)
    other = presets.build("resnet18", input_size=64).eval()
    load_exits(other, path)
    for a, b in zip(net.exits.parameters(), other.exits.parameters()):
        assert torch.equal(a.detach(), b.detach())
    twin = copy.deepcopy(net)
    x = presets.example_input("resnet18", 2, input_size=64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for a, b in zip(net(x), twin(x)):
            assert torch.equal(a, b)


def test_prepare_for_inference_can_leave_the_pages_alone():
    torch.manual_seed(0)
    net = presets.build("resnet18", input_size=64).eval()
    ptrs = [p.data_ptr() for p in net.exits.parameters()]
    report = sf.prepare_for_inference(net, memory_format=None, huge_pages=False)
    assert report.huge_pages is None and ptrs == [p.data_ptr() for p in net.exits.parameters()]


def test_a_call_under_inference_mode_leaves_ordinary_trainable_parameters():
    m = _exit()
    with torch.inference_mode():
        sf.place_in_huge_pages(m)
    assert not any(p.is_inference() for p in m.parameters())
    m.train()
    m(_x()).sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_tied_and_overlapping_parameters_still_alias():
    base = torch.randn(6)
    m = nn.Module()
    m.a, m.b = nn.Parameter(base[:4]), nn.Parameter(base[2:])
    m.lin = nn.Linear(3, 3)
    m.tied = m.lin  # the same Parameter objects registered twice
    sf.place_in_huge_pages(m)
    with torch.no_grad():
        m.a[3] = 100.0
    assert m.b[1].item() == 100.0 and m.a.storage_offset() == 0 and m.b.storage_offset() == 2
    assert m.tied.weight is m.lin.weight


def test_torch_save_writes_each_parameter_not_the_whole_mapping():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(512, 512), nn.Linear(4, 4).double())
    sf.place_in_huge_pages(m)
    for part, limit in ((m[0], 10_000), (m, 1_200_000)):  # 1 MB of Linear(512, 512) weights
        buf = io.BytesIO()
        torch.save(part.state_dict(), buf)  # (mixed dtypes: one storage each, no type clash)
        assert len(buf.getvalue()) < limit, (part, len(buf.getvalue()))
        buf.seek(0)
        for k, v in torch.load(buf).items():
            assert torch.equal(v, part.state_dict()[k])


def test_parameters_made_under_inference_mode_are_left_where_they_are():
    with torch.inference_mode():
        m = _exit()
        ref = m(_x())
    ptrs = [p.data_ptr() for p in m.parameters()]
    report = sf.place_in_huge_pages(m)
    assert report.tensors == 0 and report.inference_tensors_left == len(ptrs) and "inference_mode" in report.skipped
    assert ptrs == [p.data_ptr() for p in m.parameters()]
    with torch.inference_mode():
        assert torch.equal(m(_x()), ref)


def test_nothing_to_move_and_bad_arguments_are_reported():
    assert sf.place_in_huge_pages(nn.ReLU()).skipped == "no floating-point parameters on the CPU"
    with pytest.raises(TypeError, match="nn.Module"):
        sf.place_in_huge_pages(torch.zeros(3))


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE on this platform")
def test_the_report_reads_the_mappings_huge_pages_from_smaps():
    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    keep = []
    for _ in range(3):  # neighbouring mappings: each report counts its own region only
        m = _exit()
        report = sf.place_in_huge_pages(m)
        keep.append(m)
        span = -(-report.bytes // (2 << 20)) * (2 << 20)
        assert report.huge_bytes <= span, report
        if "[never]" in mode:
            assert report.huge_bytes == 0
        else:  # madvise / always: the fresh, advised span is backed by 2 MiB pages when memory allows
            assert report.huge_bytes >= 2 << 20, report  # (at least one: compaction may fall short)
            start = min(p.untyped_storage().data_ptr() for p in m.parameters()) // (2 << 20) * (2 << 20)
            assert _huge_bytes_of(start, start + span) == report.huge_bytes
    assert _huge_bytes_of(0, 4096) == 0  # no such region
