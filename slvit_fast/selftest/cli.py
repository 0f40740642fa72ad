"""The ``selftest`` subcommand: ``add_parser(subparsers)`` registers it, ``run(args)`` runs it."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "selftest", help="check every backend on this device against a float64 reference (forward and every "
                         "gradient, every preset and dtype), count launches, time vs eager and torch.compile")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: cuda when available, else cpu")
    p.add_argument("--json", help="write the full results (every backend x preset x dtype) as JSON here")
    p.add_argument("--quick", action="store_true",
                   help="smaller feature maps (<= 16 channels), batch 1, fewer timing anchors")
    p.add_argument("--backends", default="", help="comma list to restrict the backends (default: all usable)")
    p.add_argument("--presets", default="", help="comma list to restrict the presets (default: all)")
    p.add_argument("--no-timing", action="store_true", help="correctness and launches only")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from .runner import run_selftest

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("slvit-fast selftest: --device cuda, but torch.cuda.is_available() is False here (no GPU, or a "
              "CPU-only torch build); run with --device cpu", file=sys.stderr)
        return 2
    csv = lambda s: [t for t in (s or "").split(",") if t]  # noqa: E731
    report = run_selftest(device=device, quick=args.quick, json_path=args.json, backends=csv(args.backends) or None,
                          presets=csv(args.presets) or None, timing=not args.no_timing)
    print(report.verdict())
    return report.exit_code


def main(argv: list[str] | None = None) -> int:
    """``python -m slvit_fast.selftest.cli`` works before the subcommand is wired into slvit-fast."""
    parser = argparse.ArgumentParser(prog="slvit-fast")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["selftest", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
