"""``slvit-fast`` command line: ``demo``, ``info``, ``presets``."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(batch_size=args.batch_size, num_outputs=args.num_outputs, seed=args.seed, input_size=args.input_size)
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
    from . import native

    info["native"] = native.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"slvit_fast {info['slvit_fast']}  torch {info['torch']}  cuda available: {info['cuda_available']}")
        print("backends (for a CPU float32 tensor):")
        for name, state in info["backends_cpu"].items():
            print(f"  {name:<9} {state}")
        print("native extensions (compiled / usable here):")
        for kind, e in info["native"].items():
            archs = f" archs {','.join(e['archs']) or '-'}" if "archs" in e else ""
            note = f"  ({e['reason']})" if e.get("reason") else ""
            print(f"  {native.MODULES[kind]:<19} compiled={'yes' if e['compiled'] else 'no'}{archs}"
                  f"  usable={'yes' if e['usable_here'] else 'no'}{note}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from . import accounting, presets

    net = presets.build(args.backbone, exit_type=args.exit_type, input_size=args.input_size)
    print(accounting.summary(net).table())
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .exit_presets import PRESETS
    from .presets import list_backbones

    print("backbone presets (slvit_fast.presets.build):", ", ".join(list_backbones()))
    print("exit presets (SLViTExit.from_preset / CNNExit.from_preset):")

    for name, p in PRESETS.items():
        h, w = p.feature_size
        print(f"{name:<24} {h}x{w}x{p.in_channels:<4} patch {p.patch_size}  d={p.embed_dim} h={p.num_heads}"
              f"  outputs={p.num_outputs}  {p.note}")
    return 0


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def _ints(text: str) -> list[int]:
    return [int(t) for t in _csv(text)]


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import format_report, run_bench

    report = run_bench(
        presets=_csv(args.presets), batches=_ints(args.batches), train_batches=_ints(args.train_batches),
        backbones=_csv(args.backbones), e2e_batches=_ints(args.e2e_batches),
        throughput_backbone=args.throughput_backbone or None, throughput_batch=args.throughput_batch,
        throughput_input=args.throughput_input, repeats=args.repeats, json_path=args.json, plot_path=args.plot,
    )
    print(format_report(report))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .training.synthetic import run_synthetic_training

    run_synthetic_training(backbone=args.backbone, exit_type=args.exit_type, samples=args.samples,
                           epochs=args.epochs, batch_size=args.batch_size, input_size=args.input_size,
                           cache_dir=args.cache_dir, checkpoint_dir=args.checkpoint_dir, lr=args.lr)
    return 0


def _cmd_gpu_report(args: argparse.Namespace) -> int:
    from .gpu_report_cli import run

    return run(tuple(int(a) for a in _csv(args.archs)), tuple(_csv(args.dtypes)) or None,
               tuple(_csv(args.presets)) or None, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slvit-fast", description="Fast single-layer ViT early exits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="SL-ViT exits on a random-weight ResNet152 with a synthetic batch")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-outputs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, default=224, help="image side (224 = the paper's branch shapes)")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("info", help="version and which backends are usable here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("presets", help="list the backbone presets and the paper's exit presets")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("summary", help="paper-style parameter/FLOP table of a backbone preset with its exits")
    p.add_argument("backbone", help="resnet152, densenet201, inception_v3 or audiocsrnet")
    p.add_argument("--exit-type", default="slvit", choices=["slvit", "cnn"])
    p.add_argument("--input-size", type=int, default=None, help="image side (default: the preset's)")
    p.set_defaults(func=_cmd_summary)
    p = sub.add_parser("bench", help="exit microbenchmarks (ours vs eager vs torch.compile) and end-to-end benchmarks")
    p.add_argument("--presets", default="resnet152-b1", help="comma-separated exit presets (default resnet152-b1)")
    p.add_argument("--batches", default="1,64", help="inference batch sizes")
    p.add_argument("--train-batches", default="64", help="batch sizes of the training-step benchmark ('' for none)")
    p.add_argument("--backbones", default="resnet152", help="backbones of the end-to-end overhead benchmark")
    p.add_argument("--e2e-batches", default="1,64", help="batch sizes of the end-to-end overhead benchmark")
    p.add_argument("--throughput-backbone", default="resnet152", help="early-exit throughput backbone ('' to skip)")
    p.add_argument("--throughput-batch", type=int, default=64)
    p.add_argument("--throughput-input", type=int, default=112,
                   help="input side of the throughput benchmark (112 keeps a CPU run to minutes)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per comparison (median reported)")
    p.add_argument("--json", help="write all results as JSON here")
    p.add_argument("--plot", help="write a PNG plot of the speedups here")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("train", help="train the exits of a backbone preset on synthetic data (end-to-end example)")
    p.add_argument("--backbone", default="resnet152")
    p.add_argument("--exit-type", default="slvit", choices=["slvit", "cnn"])
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=112)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--cache-dir", help="cache branch features here (later epochs skip the backbone)")
    p.add_argument("--checkpoint-dir", help="save exits + training state every epoch; resume from it")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("gpu-report", help="compile every Triton and CUDA kernel for sm_80/sm_90 (no GPU needed): "
                       "registers, shared memory, spill bytes; plus an H100 roofline vs eager PyTorch")
    p.add_argument("--json", action="store_true")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--dtypes", default="", help="Triton dtypes, comma list (default: float32,float32-tf32,float16,bfloat16)")
    p.add_argument("--presets", default="", help="comma list (default: every preset)")
    p.set_defaults(func=_cmd_gpu_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
