"""``slvit-fast`` command line: ``demo``, ``train``, ``evaluate``, ``info``, ``presets``, ``summary``, ``bench``, ``gpu-report``.

Usage errors (an unknown backbone, a missing or malformed data file, conflicting options) print one
line ``slvit-fast <command>: error: ...`` on stderr and exit with status 2 - never a traceback.
Progress (one line per phase, one per training epoch) goes to stdout through the ``slvit_fast`` logger,
warnings to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``slvit-fast train: error: ... (see slvit-fast train --help)``."""

    def error(self, message: str):  # noqa: D401  (argparse API)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _StdStream(logging.StreamHandler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is at the time (pytest and notebooks swap them)."""

    def __init__(self, name: str):
        self._which = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._which)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the live one is always used
        pass


def _setup_logging() -> None:
    """INFO lines of the ``slvit_fast`` loggers on stdout (plain), warnings on stderr."""
    logger = logging.getLogger("slvit_fast")
    if getattr(logger, "_slvit_cli", False):
        return
    out = _StdStream("stdout")
    out.setLevel(logging.INFO)
    out.addFilter(_BelowWarning())
    out.setFormatter(logging.Formatter("%(message)s"))
    err = _StdStream("stderr")
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(out)
    logger.addHandler(err)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger._slvit_cli = True


def _si(text: str) -> float:
    """'2.5e8', '250M', '1.2G' -> float."""
    t = text.strip().upper().removesuffix("FLOPS").removesuffix("FLOP")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(t[-1:], 1.0)
    try:
        return float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of FLOPs such as 2.5e7, 25M or 0.1G, got {text!r}") from None


def _fraction_list(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.5,0.3, got {text!r}") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.synthetic:
        from .demo import run_demo

        run_demo(batch_size=args.batch_size, num_outputs=args.num_outputs, seed=args.seed,
                 input_size=args.input_size or 224)
        return 0
    from .workflow.digits import run_digits_demo

    _setup_logging()
    run_digits_demo(out=args.out, seed=args.seed, input_size=args.input_size or 32, threads=args.threads,
                    backbone_epochs=args.backbone_epochs, exit_epochs=args.exit_epochs, samples=args.samples)
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
    info["cpu_fused_isa"] = _fused_isa()
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
        print(f"cpu backend's fused inference kernels: {info['cpu_fused_isa'] or 'off (ATen/BLAS path)'}")
    return 0


def _fused_isa() -> str | None:
    """"avx512" / "avx2" / None (fused path off or not built); a bad SLVIT_FAST_CPU_ISA is shown, not raised,
    so that `info` still reports everything else."""
    from .backends import cpu_backend

    try:
        return cpu_backend.fused_isa()
    except RuntimeError as e:
        return f"error: {str(e).splitlines()[0]}"


def _preset_name(text: str) -> str:
    """The canonical backbone preset name, or a usage error with suggestions ('resnt18' -> 'resnet18')."""
    from .presets import canonical_name
    from .workflow import UsageError

    try:
        return canonical_name(text)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _cmd_summary(args: argparse.Namespace) -> int:
    from . import accounting, presets

    net = presets.build(_preset_name(args.backbone), exit_type=args.exit_type, input_size=args.input_size)
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
        anchors=() if args.no_slow_anchors else None,
    )
    print(format_report(report))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .workflow import UsageError

    _preset_name(args.backbone)
    real_only = {"--out": args.out, "--weights": args.weights, "--exits": args.exits, "--budget": args.budget,
                 "--fractions": args.fractions, "--train-backbone-epochs": args.train_backbone_epochs}
    if args.data is None:  # the synthetic example (no data needed)
        given = [k for k, v in real_only.items() if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need --data (an ImageFolder directory or an .npz file)")
        from .training.synthetic import run_synthetic_training

        _setup_logging()
        run_synthetic_training(backbone=args.backbone, exit_type=args.exit_type, samples=args.samples or 256,
                               epochs=args.epochs or 5, batch_size=args.batch_size or 32,
                               input_size=args.input_size or 112, cache_dir=args.cache_dir,
                               checkpoint_dir=args.checkpoint_dir, lr=args.lr)
        return 0
    for flag, value in (("--samples", args.samples), ("--cache-dir", args.cache_dir),
                        ("--checkpoint-dir", args.checkpoint_dir)):
        if value is not None:
            raise UsageError(f"{flag} is for the synthetic example; with --data the cache is OUT/cache")
    if args.out is None:
        raise UsageError("--data needs --out DIR (where the run is written)")
    from .workflow import RunSpec, run_experiment

    _setup_logging()
    run_experiment(RunSpec(
        data=args.data, backbone=args.backbone, out=args.out, weights=args.weights,
        exit_paths=[p for p in args.exits.split(",") if p.strip()] if args.exits else None,
        exit_types=(args.exit_type,), input_size=args.input_size, epochs=args.epochs or 30,
        batch_size=args.batch_size or 64, lr=args.lr, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, seed=args.seed, train_backbone_epochs=args.train_backbone_epochs or 0,
        backbone_lr=args.backbone_lr, budget=args.budget, fractions=args.fractions,
        timing_repeats=args.timing_repeats,
    ))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .workflow import evaluate_run
    from .workflow.rundir import write_json

    _setup_logging()
    report = evaluate_run(args.run, args.data, timing_repeats=args.timing_repeats,
                          prepare_inference=args.prepare_inference)
    if args.json:
        write_json(args.json, report)
    return 0


def _cmd_gpu_report(args: argparse.Namespace) -> int:
    from .gpu_report_cli import run

    return run(tuple(int(a) for a in _csv(args.archs)), tuple(_csv(args.dtypes)) or None,
               tuple(_csv(args.presets)) or None, args.json)


TRAIN_HELP = """Train early exits on your data and write a run directory (with --data), e.g.

  slvit-fast train --data images/ --backbone resnet18 --weights IMAGENET1K_V1 --input-size 128 \\
      --train-backbone-epochs 3 --out run1
  slvit-fast evaluate --run run1 --data images/

--data: an ImageFolder directory (DATA/<class>/<image>.png|jpg|...) or an .npz with arrays x and y;
x is (N,H,W) grayscale, (N,C,H,W) or (N,H,W,C) with C = 1 or 3 (uint8 divided by 255); y holds N labels.
Images are resized to --input-size and normalised (ImageNet statistics for torchvision weights, else
the training split's). The data is split train/val/test with --seed; exits are trained classifier-wise
on the frozen backbone (feature cache in OUT/cache), thresholds calibrated on val (--budget or
--fractions), and the test split evaluated with real early exit. OUT gets run.json, exits.safetensors,
policy.json, report.json, accuracy_flops.png (and backbone.safetensors when the backbone changed).

Without --data: the synthetic example (4-class quadrant task on random-weight backbones), e.g.
  slvit-fast train --backbone resnet152 --epochs 5 --cache-dir feats/
"""


def _backbone_names() -> list[str]:
    from .backbone_presets import list_backbones

    return list_backbones()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slvit-fast", description="Fast single-layer ViT early exits.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the paper's experiment in miniature: train ResNet18 on scikit-learn's digits, "
                       "SL-ViT vs CNN exits, calibrated early exit, FLOPs and wall-clock (about a minute); "
                       "--synthetic: the mechanics on a random-weight ResNet152")
    p.add_argument("--synthetic", action="store_true",
                   help="random-weight ResNet152 with the paper's exits on a random batch (mechanics only)")
    p.add_argument("--out", default="slvit-fast-demo", help="output folder of the digits demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--input-size", type=int, default=None,
                   help="image side (digits demo: 32; --synthetic: 224 = the paper's branch shapes)")
    p.add_argument("--threads", type=int, default=1,
                   help="digits demo: torch intra-op threads (default 1: repeatable numbers, and fastest on a busy machine)")
    p.add_argument("--backbone-epochs", type=int, default=3, help="digits demo: ResNet18 training epochs")
    p.add_argument("--exit-epochs", type=int, default=20, help="digits demo: exit training epochs (early stopping)")
    p.add_argument("--samples", type=int, default=None, help="digits demo: use a random subset of this many images")
    p.add_argument("--batch-size", type=int, default=4, help="--synthetic: batch size")
    p.add_argument("--num-outputs", type=int, default=10, help="--synthetic: classes")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("info", help="version and which backends are usable here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("presets", help="list the backbone presets and the paper's exit presets")
    p.set_defaults(func=_cmd_presets)
    p = sub.add_parser("summary", help="paper-style parameter/FLOP table of a backbone preset with its exits")
    p.add_argument("backbone", help=", ".join(_backbone_names()))
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
    p.add_argument("--no-slow-anchors", action="store_true",
                   help="skip the torch.compile max-autotune and ONNX Runtime columns (about the old run time)")
    p.set_defaults(func=_cmd_bench)
    p = sub.add_parser("train", help="train exits on your data (--data: ImageFolder dir or .npz) and write a run "
                       "directory; without --data, the synthetic example", description=TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="ImageFolder directory (DATA/<class>/<image>) or .npz with x (N,H,W | N,C,H,W | "
                   "N,H,W,C; C=1 or 3; uint8 /255) and y (N labels)")
    p.add_argument("--backbone", default="resnet152", help="a preset: " + ", ".join(_backbone_names()))
    p.add_argument("--weights", help="backbone weights: .pt/.pth/.safetensors state_dict file, or a torchvision "
                   "weights name (IMAGENET1K_V1, DEFAULT; downloaded unless cached)")
    p.add_argument("--exits", help="comma-separated module paths for the exits (default: the preset's branches)")
    p.add_argument("--exit-type", default="slvit", choices=["slvit", "cnn"])
    p.add_argument("--input-size", type=int, default=None, help="image side in pixels (default: the preset's, "
                   "224; synthetic: 112)")
    p.add_argument("--out", help="run directory to write (needed with --data)")
    p.add_argument("--epochs", type=int, default=None, help="exit training epochs (default 30; synthetic 5)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (synthetic 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="exit learning rate (Adam)")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--train-backbone-epochs", type=int, default=None,
                   help="first fine-tune the whole backbone (classifier included) for N epochs with Adam")
    p.add_argument("--backbone-lr", type=float, default=1e-3)
    cal = p.add_mutually_exclusive_group()
    cal.add_argument("--budget", type=_si, help="mean FLOPs per sample for the exit thresholds (e.g. 25M); "
                     "default: half the backbone's")
    cal.add_argument("--fractions", type=_fraction_list,
                     help="fractions of samples to leave at each exit, e.g. 0.5,0.3 (rest: the final output)")
    p.add_argument("--timing-repeats", type=int, default=3, help="rounds of the wall-clock measurement")
    p.add_argument("--samples", type=int, default=None, help="synthetic example only (default 256)")
    p.add_argument("--cache-dir", help="synthetic example: cache branch features here (later epochs skip the backbone)")
    p.add_argument("--checkpoint-dir", help="synthetic example: save exits + training state every epoch; resume from it")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("evaluate", help="rebuild a 'train --data' run and print its per-exit and early-exit table")
    p.add_argument("--run", required=True, help="run directory written by slvit-fast train --out")
    p.add_argument("--data", required=True, help="the data (same path/format as for train; the same test split is used)")
    p.add_argument("--json", help="also write the evaluation report here")
    p.add_argument("--timing-repeats", type=int, default=3)
    p.add_argument("--prepare-inference", action="store_true",
                   help="evaluate the network as deployed on CPU: BatchNorms folded into the convolutions and "
                        "channels_last (slvit_fast.prepare_for_inference); faster early exit, same answers up to "
                        "float rounding")
    p.set_defaults(func=_cmd_evaluate)
    p = sub.add_parser("gpu-report", help="compile every Triton and CUDA kernel for sm_80/sm_90 (no GPU needed): "
                       "registers, shared memory, spill bytes, tensor-core instructions, occupancy; plus an H100 roofline "
                       "vs eager PyTorch and CUDA graphs")
    p.add_argument("--json", action="store_true")
    p.add_argument("--archs", default="80,90")
    p.add_argument("--dtypes", default="", help="Triton dtypes, comma list (default: float32,float32-tf32,float16,bfloat16)")
    p.add_argument("--presets", default="", help="comma list (default: every preset)")
    p.set_defaults(func=_cmd_gpu_report)
    from .selftest.cli import add_parser as add_selftest_parser  # light: the runner is imported on use

    add_selftest_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backbones.weights import WeightsUnavailableError
    from .errors import CheckpointMismatchError
    from .training.feature_cache import FeatureCacheError
    from .workflow.errors import UsageError

    try:
        return args.func(args)
    except (UsageError, CheckpointMismatchError, FeatureCacheError) as e:
        # the user's inputs or files (a checkpoint_dir of another run, a damaged feature cache): the message
        # names the file and what to do; a traceback would only bury it. One line: a multi-line message (every
        # mismatching exit field) is joined with "; ".
        msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if isinstance(e, FeatureCacheError):
            msg += (" (slvit-fast train: the cache is the folder named above, under OUT/cache or --cache-dir; "
                    "delete it and rerun to rebuild it)")
        print(f"slvit-fast {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except WeightsUnavailableError as e:  # offline: one line saying what to download and where to put it
        print(f"slvit-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
