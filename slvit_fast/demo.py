"""The README's main job: SL-ViT exits on a random-weight torchvision ResNet152, one synthetic batch.

Nothing is downloaded: the backbone has random weights and the batch is random noise, so the demo
shows shapes, parameter counts and plumbing, not accuracy.
"""

from __future__ import annotations

import time

import torch

from .slvit_exit import SLViTExit

# torchvision module whose output feeds each paper branch of ResNet152 (Keras counting, Table II):
# the 12th convolution is the strided 3x3 conv of the first layer2 block (28x28x128); the 36th is the
# last conv of layer2, whose block output (28x28x512) is layer2's output.
RESNET152_BRANCHES = {"resnet152-b1": "layer2.0.conv2", "resnet152-b2": "layer2"}


def run_demo(batch_size: int = 4, num_outputs: int = 10, seed: int = 0) -> None:
    try:
        import torchvision
    except ImportError as e:
        raise SystemExit(f"the demo needs torchvision (pip install 'slvit_fast[vision]'): {e}")
    torch.manual_seed(seed)
    backbone = torchvision.models.resnet152(weights=None, num_classes=num_outputs).eval()
    exits = {preset: SLViTExit.from_preset(preset, num_outputs=num_outputs).eval() for preset in RESNET152_BRANCHES}
    features: dict[str, torch.Tensor] = {}
    modules = dict(backbone.named_modules())
    for preset, path in RESNET152_BRANCHES.items():
        modules[path].register_forward_hook(lambda _m, _i, out, preset=preset: features.__setitem__(preset, out))

    x = torch.randn(batch_size, 3, 224, 224)
    print(f"ResNet152 (random weights), synthetic batch {tuple(x.shape)}")
    with torch.inference_mode():
        t0 = time.perf_counter()
        final = backbone(x)
        t_backbone = time.perf_counter() - t0
        print(f"  backbone output {tuple(final.shape)}  ({t_backbone * 1e3:.0f} ms)")
        for preset, exit_module in exits.items():
            feat = features[preset]
            t0 = time.perf_counter()
            out = exit_module(feat)
            dt = time.perf_counter() - t0
            n_params = sum(p.numel() for p in exit_module.parameters())
            c = exit_module.config
            print(
                f"  exit {preset:<13} at {RESNET152_BRANCHES[preset]:<15} features {tuple(feat.shape)} -> "
                f"output {tuple(out.shape)}; {n_params:,} parameters ({n_params / 1e6:.2f}M); "
                f"grid {c.grid[0]}x{c.grid[1]}, d={c.embed_dim}, h={c.num_heads}; "
                f"backend {exit_module.active_backend(feat)!r}; {dt * 1e3:.1f} ms"
            )
