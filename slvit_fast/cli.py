"""``slvit-fast`` command line: ``demo``, ``info``, ``presets``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(batch_size=args.batch_size, num_outputs=args.num_outputs, seed=args.seed)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__, backends

    info = {
        "slvit_fast": __version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "backends_cpu": backends.status(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"slvit_fast {info['slvit_fast']}  torch {info['torch']}  cuda available: {info['cuda_available']}")
        print("backends (for a CPU float32 tensor):")
        for name, state in info["backends_cpu"].items():
            print(f"  {name:<9} {state}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .exit_presets import PRESETS

    for name, p in PRESETS.items():
        h, w = p.feature_size
        print(f"{name:<24} {h}x{w}x{p.in_channels:<4} patch {p.patch_size}  d={p.embed_dim} h={p.num_heads}"
              f"  outputs={p.num_outputs}  {p.note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slvit-fast", description="Fast single-layer ViT early exits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="SL-ViT exits on a random-weight ResNet152 with a synthetic batch")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-outputs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("info", help="version and which backends are usable here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("presets", help="list the paper's exit presets")
    p.set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
