"""Sizing exits for a feature map (issue #13 item 1): ``SLViTConfig.for_feature_map`` reproduces the
paper's patch sizes and exits, and on every map the SL-ViT exit has no more parameters and FLOPs than
``CNNExitConfig.for_feature_map`` on the same map."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import slvit_fast as sf
from slvit_fast import CNNExit, CNNExitConfig, SLViTConfig, SLViTExit, accounting
from slvit_fast.config import patch_for_map
from slvit_fast.exit_presets import PRESETS

MAPS = [(8, 8), (7, 7), (14, 14), (28, 28), (25, 25), (56, 56), (72, 128), (9, 16), (18, 32), (4, 4), (1, 1)]
CHANNELS = [16, 64, 128, 256, 512, 1024]


def params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("size, patch", [((28, 28), 4), ((25, 25), 5), ((72, 128), 8), ((14, 14), 2),
                                         ((56, 56), 7), ((7, 7), 1), ((9, 16), 1)])
def test_patch_rule_reproduces_the_paper(size, patch):
    assert patch_for_map(size) == patch
    assert SLViTConfig.for_feature_map(256, size, 10).patch_size == (patch, patch)


@pytest.mark.parametrize("name", [n for n in PRESETS if PRESETS[n].backbone != "audiocsrnet"])
def test_paper_maps_give_the_paper_exits(name):
    p = PRESETS[name]
    paper = SLViTConfig(**p.slvit_kwargs())
    fixed = {k: getattr(paper, k) for k in ("embed_dim", "num_heads") if getattr(paper, k) != getattr(SLViTConfig, k)}
    got = SLViTConfig.for_feature_map(p.in_channels, p.feature_size, p.num_outputs, **fixed)
    cnn = CNNExitConfig.for_feature_map(p.in_channels, p.feature_size, p.num_outputs)
    if not fixed or paper.num_params() <= cnn.num_params():
        assert got == paper
    else:  # CIFAR-100 Inception (d=36, h=8): the paper has it level with the CNN exit (0.63M each); with
        # the fitted hidden sizes it is 1% above, so the rule shrinks the hidden sizes and keeps d, h, patch
        assert got.replace(key_dim=paper.key_dim, mlp_dim=paper.mlp_dim, head_hidden=paper.head_hidden) == paper
        assert got.num_params() <= cnn.num_params() and got.mlp_dim < paper.mlp_dim
    assert CNNExitConfig.for_feature_map(p.in_channels, p.feature_size, p.num_outputs) == CNNExitConfig(**p.cnn_kwargs())


def test_disco_map_keeps_the_paper_patch_and_pool():
    s = SLViTConfig.for_feature_map(512, (72, 128), 1)
    c = CNNExitConfig.for_feature_map(512, (72, 128), 1)
    assert s.patch_size == (8, 8) and s.grid == (9, 16) and (s.embed_dim, s.num_heads) == (32, 12)
    assert c.pool_size == (4, 4) and c.filters == 15 and c.head_hidden == 268


@pytest.mark.parametrize("size, C", list(itertools.product(MAPS, CHANNELS)))
def test_slvit_never_larger_than_cnn(size, C):
    s = SLViTConfig.for_feature_map(C, size, 10)
    c = CNNExitConfig.for_feature_map(C, size, 10)
    assert s.num_params() <= c.num_params(), (s, c)
    assert accounting.slvit_flops(s) <= accounting.cnn_exit_flops(c), (s, c)
    assert s.feature_size == size and s.in_channels == C and s.num_outputs == 10
    # the paper's width and heads go only once the hidden sizes are at their floors
    if (s.embed_dim, s.num_heads) != (32, 12):
        assert (s.key_dim, s.mlp_dim, s.head_hidden) == (4, 16, 8)


def test_the_8x8_map_of_the_issue():
    """Issue #13: the 28x28-fitted defaults gave the SL-ViT exit 3.2x the CNN exit's parameters on 8x8."""
    s, c = SLViTConfig.for_feature_map(512, 8, 10), CNNExitConfig.for_feature_map(512, 8, 10)
    assert params(SLViTExit(s, backend="torch")) <= params(CNNExit(c))
    assert s.patch_size == (2, 2) and s.head_hidden < 268 and s.mlp_dim < 1024


@pytest.mark.parametrize("size, C", [((8, 8), 512), ((7, 7), 16), ((72, 128), 1024), ((9, 16), 64), ((25, 25), 288)])
def test_cost_formulas_equal_the_modules(size, C):
    """num_params() is the module's parameter count; flops() is what FlopCounterMode counts."""
    from torch.utils.flop_counter import FlopCounterMode

    s, c = SLViTConfig.for_feature_map(C, size, 10), CNNExitConfig.for_feature_map(C, size, 10)
    ms, mc = SLViTExit(s, backend="torch"), CNNExit(c)
    assert s.num_params() == params(ms) and c.num_params() == params(mc)
    x = torch.randn(1, C, *size)
    for cfg, module in ((s, ms), (c, mc)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(x)
        assert cfg.flops() == counter.get_total_flops()


def test_overrides_are_kept():
    s = SLViTConfig.for_feature_map(256, (25, 25), 100, embed_dim=36, num_heads=8, mlp_residual=False)
    assert (s.embed_dim, s.num_heads, s.mlp_residual, s.num_outputs) == (36, 8, False, 100)
    s = SLViTConfig.for_feature_map(128, (28, 28), 10, patch_size=7)
    assert s.patch_size == (7, 7) and s.grid == (4, 4)
    c = CNNExitConfig.for_feature_map(128, (28, 28), 10, filters=8, pool_size=4)
    assert c.filters == 8 and c.pool_size == (4, 4)
    with pytest.raises(TypeError, match="unknown_field"):
        SLViTConfig.for_feature_map(128, (28, 28), 10, unknown_field=1)


def test_small_maps_pool_clipped():
    assert CNNExitConfig.for_feature_map(16, (1, 1), 3).pool_size == (1, 1)
    assert CNNExitConfig.for_feature_map(16, (7, 7), 3).pool_size == (2, 2)


def test_exported_from_the_package():
    assert sf.SLViTConfig.for_feature_map is not None and sf.CNNExitConfig.for_feature_map is not None
