"""Preset exits reproduce every published branch parameter count of the SL-ViT paper within 5%.

Rows: Tables IV-VIII (CIFAR-10, CIFAR-100, Speech Commands, GTZAN, DISCO) and Table X (heads), for SL-ViT
and CNN exits alike. Each row: (table, preset, num_outputs, overrides, published SL-ViT M, published CNN M).
"""

import pytest

from slvit_fast import CNNExit, SLViTExit, list_presets

DATASET_OUTPUTS = {"CIFAR-10": 10, "CIFAR-100": 100, "SC": 12, "GTZAN": 10, "DISCO": 1}

# (table/dataset, preset, slvit M, cnn M)
PUBLISHED = [
    ("CIFAR-10", "resnet152-b1", 0.59, 0.78), ("CIFAR-10", "resnet152-b2", 0.79, 0.83),
    ("CIFAR-10", "densenet201-b1", 0.59, 0.78), ("CIFAR-10", "densenet201-b2", 0.66, 0.80),
    ("CIFAR-10", "inceptionv3-b1", 0.56, 0.61), ("CIFAR-10", "inceptionv3-b2", 0.56, 0.61),
    ("CIFAR-100", "resnet152-b1", 0.61, 0.80), ("CIFAR-100", "resnet152-b2", 0.81, 0.86),
    ("CIFAR-100", "densenet201-b1", 0.61, 0.80), ("CIFAR-100", "densenet201-b2", 0.68, 0.82),
    ("CIFAR-100", "inceptionv3-b1-cifar100", 0.63, 0.63), ("CIFAR-100", "inceptionv3-b2-cifar100", 0.63, 0.63),
    ("SC", "resnet152-b1", 0.59, 0.78), ("SC", "resnet152-b2-h24", 0.84, 0.84),
    ("SC", "densenet201-b1", 0.59, 0.78), ("SC", "densenet201-b2", 0.66, 0.80),
    ("SC", "inceptionv3-b1", 0.56, 0.61), ("SC", "inceptionv3-b2", 0.56, 0.61),
    ("GTZAN", "resnet152-b1", 0.59, 0.78), ("GTZAN", "resnet152-b2-h24", 0.83, 0.83),
    ("GTZAN", "densenet201-b1", 0.59, 0.78), ("GTZAN", "densenet201-b2", 0.66, 0.80),
    ("GTZAN", "inceptionv3-b1", 0.56, 0.61), ("GTZAN", "inceptionv3-b2", 0.56, 0.61),
    ("DISCO", "audiocsrnet-v1", 2.35, 2.50), ("DISCO", "audiocsrnet-av1", 2.36, 2.52),
    ("DISCO", "audiocsrnet-av2", 2.35, 2.50),
]
# Table X: ResNet152 branch 1, CIFAR-10, varying heads (SL-ViT only; the CNN row is 0.78M as above).
TABLE_X = [(4, 0.55), (8, 0.57), (12, 0.59), (16, 0.60)]
TOLERANCE = 0.05


def _millions(module):
    return sum(p.numel() for p in module.parameters()) / 1e6


def _check(measured, published, what):
    rel = abs(measured - published) / published
    assert rel <= TOLERANCE, f"{what}: {measured:.3f}M vs published {published:.2f}M ({rel:.1%} > {TOLERANCE:.0%})"


@pytest.mark.parametrize("dataset,preset,slvit_m,cnn_m", PUBLISHED, ids=[f"{d}-{p}" for d, p, *_ in PUBLISHED])
def test_published_branch_params(dataset, preset, slvit_m, cnn_m):
    outputs = DATASET_OUTPUTS[dataset]
    _check(_millions(SLViTExit.from_preset(preset, num_outputs=outputs)), slvit_m, f"SL-ViT {dataset} {preset}")
    _check(_millions(CNNExit.from_preset(preset, num_outputs=outputs)), cnn_m, f"CNN {dataset} {preset}")


@pytest.mark.parametrize("heads,published", TABLE_X)
def test_table_x_heads(heads, published):
    _check(_millions(SLViTExit.from_preset("resnet152-b1", num_outputs=10, num_heads=heads)), published,
           f"Table X, {heads} heads")


def test_every_preset_has_a_published_row():
    covered = {preset for _, preset, *_ in PUBLISHED}
    assert covered == set(list_presets())


def test_the_tolerance_check_can_fail():
    with pytest.raises(AssertionError):
        _check(0.70, 0.59, "deliberately wrong")
