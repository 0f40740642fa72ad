"""place_in_huge_pages: the exits' parameters moved into one 2 MiB-page mapping keep their identity,
values, layout and every use (inference, training, checkpoints, deepcopy); prepare_for_inference does it
last; the mapping outlives every reference but the parameters."""

from __future__ import annotations

import copy
import gc
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
        assert p.data_ptr() % 64 == 0
        ptrs.append(p.untyped_storage().data_ptr())
    assert len(set(ptrs)) == 1  # one mapping for all of them
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
    m = _exit()
    report = sf.place_in_huge_pages(m)
    if "[never]" in mode:
        assert report.huge_bytes == 0
    else:  # madvise / always: the fresh, advised mapping is backed by 2 MiB pages when memory allows
        assert report.huge_bytes >= 2 << 20, report
        assert _huge_bytes_of(next(m.parameters()).data_ptr()) == report.huge_bytes
    assert _huge_bytes_of(0) == 0  # an address in no mapping
