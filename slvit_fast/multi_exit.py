"""``MultiExitNetwork``: exits attached to an unmodified backbone, and per-sample early exit with batch compaction.

An exit reads the output of a named submodule of the backbone through a forward hook. The backbone's
code and weights are left as they were; each watched submodule gets one hook when the network is
built, which acts only inside this network's own calls, in the calling thread (per-call state lives
in a ``contextvars`` scope, :mod:`slvit_fast.hook_scope`): ``net(x)``, ``net.early_exit(...)`` and
the shape queries may run concurrently from several threads, and calling the backbone directly is
unaffected.

Exits with an extra input (the audiovisual AV1 exit: visual feature map + audio embedding) name the
second module too::

    MultiExitNetwork(backbone, exits={
        "encoders.visual": v1_exit,                                  # feature map only
        "encoders.visual#av1": (av1_exit, "encoders.audio"),         # (exit, extra path)
    })

(keys are unique, so a second exit on the same module gets a tag after ``#``, as above:
``"encoders.visual#av1"`` reads ``encoders.visual``; the ``extra_from=`` mapping is an alternative to
the tuple form). The extra tensor is passed to the exit as
``exit(features, extra=extra)``; a 2-D extra (B, D) is reshaped to (B, extra_tokens, D/extra_tokens)
for an SL-ViT exit with extra tokens.

Batch compaction (``early_exit``)
---------------------------------
The backbone runs once, with hooks. When an exit's inputs are ready, the exit runs on the samples still
alive, the policy decides which of them exit, and at the exit's *compaction point* the hook returns the
feature tensor with the exited rows removed, so every deeper layer sees fewer rows. An index map
(``rows``: original sample index of each row) puts answers back in input order.

Removing rows is only safe where nothing computed *before* that point is used *after* it with the old
batch size. Inside a torchvision ``Bottleneck`` the shortcut tensor is computed from the block input,
so compacting the output of ``layer2.0.conv2`` would make ``out += identity`` fail. The compaction point
of an exit is therefore the first *safe* module at or above its hook point: a module is safe when its
parent is the backbone itself (whose ``forward`` is taken to be a chain of its children - true for
torchvision ResNet/DenseNet/Inception-v3 and for the presets' AudioCSRNet) or an ``nn.Sequential``
that is itself safe. For ``layer2.0.conv2`` this is the block output ``layer2.0``: the exit runs at
``conv2`` (its answer does not change) and the rows leave the batch at the end of the block (the rest
of that one block still runs on them). Override with ``compact_at={"exit path": "module path"}``;
outputs that are tuples/lists (e.g. a fusion block returning ``(visual, audio)``) are compacted
element-wise.

Exits are ordered by when their hooks fire (a module's forward hook fires when it *finishes*, so
``layer2.0.conv2`` comes before ``layer2``); an exit with an extra input runs when the later of its two
inputs is ready. A hooked module that runs twice in one forward (e.g. torchvision's shared ReLU in a
bottleneck) is an error. Once no sample is left, the backbone stops (the deeper layers never run).

The state of one ``early_exit`` call (row map, alive mask, answers so far) and its hook callbacks live
in :mod:`slvit_fast.early_exit_run`; this module keeps the network and the hooks.

Other entry points: ``net(x)`` (every exit on every sample + final output), :meth:`branch_features`
(the inputs of every exit, for caching features in exit training; :meth:`exit_forward` runs exit i on
one of them), :meth:`feature_shapes` / :meth:`validate` (shapes only, under ``FakeTensorMode``).

Results equal running every exit on every sample and applying the policy afterwards
(:func:`slvit_fast.policies.apply`), up to float rounding of batch-size-dependent kernels; the backbone
must be in eval mode (BatchNorm with batch statistics would couple the samples).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from .early_exit_run import as_inputs as _as_inputs, batch_of as _batch_of, batchnorm_modules, run_early_exit
from .exit_result import EarlyExitResult
from .hook_scope import hold, watching
from .shape_probe import probe, shape_of, unknown_path

__all__ = ["MultiExitNetwork", "EarlyExitResult"]

# set on a backbone whose BatchNorms were folded into its convolutions (slvit_fast.inference_prep): such a
# backbone has no BatchNorm left to train, so train() refuses to unfreeze it
BATCHNORM_FOLDED_ATTR = "_slvit_fast_batchnorm_folded"


def _version_of(obj: Any) -> int | None:
    """A tensor's in-place version counter; None for non-tensors and inference-mode tensors (no counter)."""
    if not isinstance(obj, Tensor) or obj.is_inference():
        return None
    return obj._version


def _sanitize(path: str) -> str:
    return path.replace(".", "__").replace("#", "--") or "root"


def _post_order(root: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}

    def visit(m: nn.Module, prefix: str) -> None:
        for name, child in m.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path not in out:
                visit(child, path)
                out[path] = len(out)

    visit(root, "")
    return out


class MultiExitNetwork(nn.Module):
    """A backbone with early exits attached to named submodules.

    Args:
        backbone: any ``nn.Module``; called as ``backbone(*inputs)`` and returning the final output.
        exits: ``{"module.path": exit}`` or ``{"module.path": (exit, "extra.module.path")}``; the exit
            is called on the output of that module (and on the extra module's output as ``extra=``).
        freeze_backbone: (default) backbone parameters get ``requires_grad=False`` and the backbone
            stays in eval mode even under ``net.train()`` (BatchNorm statistics and Dropout frozen).
        extra_from: alternative to the tuple form: ``{"module.path": "extra.module.path"}``.
        compact_at: ``{"exit module path": "module path"}`` overrides the automatic compaction point.
        backbone_is_chain: the backbone's own ``forward`` feeds each direct child only the previous
            child's output (so a direct child's output is a safe compaction point). Default True.

    Attributes: ``exits`` (``nn.ModuleDict``, keys are the paths with ``.`` -> ``__``, in depth order),
    ``exit_paths`` (module paths, same order), ``extra_paths`` (None where the exit has no extra
    input), ``ready_at`` (the module after which exit i has all its inputs: the later of its feature
    and extra modules), ``compaction_points``, ``num_exits``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        exits: Mapping[str, Any],
        freeze_backbone: bool = True,
        extra_from: Mapping[str, str] | None = None,
        compact_at: Mapping[str, str] | None = None,
        backbone_is_chain: bool = True,
    ):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        if not exits:
            raise ValueError("MultiExitNetwork needs at least one exit")
        self.backbone = backbone
        self.freeze_backbone = bool(freeze_backbone)
        self.backbone_is_chain = bool(backbone_is_chain)
        # forward hooks fire when a module *finishes*: order exit points by post-order position
        order = _post_order(backbone)
        extra_from = dict(extra_from or {})
        compact_at = dict(compact_at or {})
        for key in list(extra_from) + list(compact_at):
            if key not in exits:
                raise ValueError(f"extra_from/compact_at key {key!r} is not an exit path; exit paths: {list(exits)}")

        specs = []
        for path, spec in exits.items():
            path = str(path).strip()
            extra_path = extra_from.get(path)
            if isinstance(spec, (tuple, list)):
                if len(spec) != 2:
                    raise ValueError(f"exit spec for {path!r} must be a module or (module, extra_path), got {spec!r}")
                spec, extra_path = spec
            if not isinstance(spec, nn.Module):
                raise TypeError(f"exit for {path!r} must be an nn.Module, got {type(spec).__name__}")
            module_path = path.split("#", 1)[0]
            self._check_path(module_path, order, "exit")
            if extra_path is not None:
                self._check_path(extra_path, order, "extra input")
            trigger = max((module_path, extra_path) if extra_path else (module_path,), key=order.__getitem__)
            cpath = compact_at.get(path)
            if cpath is None:
                cpath = self._safe_point(trigger)
            else:
                self._check_path(cpath, order, "compaction point")
            specs.append((order[trigger], order[module_path], path, spec, extra_path, trigger, cpath, module_path))
        specs.sort(key=lambda s: (s[0], s[1]))
        keys = [_sanitize(s[2]) for s in specs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two exits attached to the same module path: {[s[2] for s in specs]}")
        self.exits = nn.ModuleDict({k: s[3] for k, s in zip(keys, specs)})
        self.exit_paths: list[str] = [s[2] for s in specs]
        self.exit_modules: list[str] = [s[7] for s in specs]  # exit_paths without a '#tag'
        self.extra_paths: list[str | None] = [s[4] for s in specs]
        self.ready_at: list[str] = [s[5] for s in specs]
        self._triggers = self.ready_at  # older name, still read by slvit_fast/bench
        self.compaction_points: list[str] = [s[6] for s in specs]
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()
        # per-call work done once here (it cost ~1.3 ms per call on ResNet152, walking ~500 modules):
        # the watched paths, which exits read each of them, and the BatchNorm modules early_exit checks
        # (those present now: a BatchNorm swapped into the backbone later is not checked)
        paths = set(self.ready_at) | set(self.exit_modules) | {p for p in self.extra_paths if p}
        self._watched_paths: tuple[str, ...] = tuple(sorted(paths | set(self.compaction_points)))
        # one dispatching hook per watched module, for good: calls never add or remove hooks, so calls
        # from several threads cannot see each other's (see slvit_fast.hook_scope)
        hold(self._hooked_modules().values())
        self._needed_by: dict[str, list[int]] = {}
        for i, (p, e) in enumerate(zip(self.exit_modules, self.extra_paths)):
            for q in (p, e):
                if q:
                    self._needed_by.setdefault(q, []).append(i)
        self._batchnorms = batchnorm_modules(self.backbone)
        self._cost_cache: dict[tuple, tuple[list[float], float]] = {}  # input sizes -> FLOPs (EarlyExitResult)

    # -- construction helpers --------------------------------------------------------------------
    def _check_path(self, path: str, order: Mapping[str, int], what: str) -> None:
        if path not in order:
            raise unknown_path(self.backbone, path, what)

    def _safe_point(self, path: str) -> str:
        modules = dict(self.backbone.named_modules())

        def safe(p: str) -> bool:
            parent = p.rsplit(".", 1)[0] if "." in p else ""
            if parent == "":
                return self.backbone_is_chain
            return isinstance(modules[parent], nn.Sequential) and safe(parent)

        p = path
        while p and not safe(p):
            p = p.rsplit(".", 1)[0] if "." in p else ""
        if not p:
            raise ValueError(
                f"no safe compaction point above {path!r} (the backbone is not a chain of its children); "
                "pass compact_at={exit path: module path}"
            )
        return p

    # -- basic properties ------------------------------------------------------------------------
    @property
    def num_exits(self) -> int:
        """Number of early exits (the final output is not counted)."""
        return len(self.exit_paths)

    def exit_list(self) -> list[nn.Module]:
        return list(self.exits.values())

    def exit_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """Parameters of the exits only (what exit training optimizes)."""
        return self.exits.parameters(recurse)

    def save_exits(self, path: str) -> None:
        """Save the exits only (weights + each exit's config as plain data), atomically (safetensors)."""
        from .checkpoint import save_exits

        save_exits(self, path)

    def load_exits(self, path: str) -> None:
        """Load exits saved by :meth:`save_exits`; a config or shape mismatch raises naming it."""
        from .checkpoint import load_exits

        load_exits(self, path)

    def train(self, mode: bool = True) -> "MultiExitNetwork":
        if mode and not self.freeze_backbone and any(getattr(m, BATCHNORM_FOLDED_ATTR, False)
                                                      for m in self.backbone.modules()):
            raise RuntimeError("train(): this backbone's BatchNorms were folded into its convolutions for "
                               "inference (prepare_for_inference / fold_batchnorm), so it cannot be trained; "
                               "rebuild it from its weights, or keep freeze_backbone=True to train the exits only")
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # BatchNorm statistics / Dropout of a frozen backbone never change
        return self

    def extra_repr(self) -> str:
        parts = [
            f"{p}" + (f"+{e}" if e else "") + (f" (compact at {c})" if c != p else "")
            for p, e, c in zip(self.exit_paths, self.extra_paths, self.compaction_points)
        ]
        return f"exits=[{', '.join(parts)}], freeze_backbone={self.freeze_backbone}"

    # -- running exits ---------------------------------------------------------------------------
    def _call_exit(self, i: int, feat: Any, extra: Any) -> Tensor:
        module = self.exits[_sanitize(self.exit_paths[i])]
        if not isinstance(feat, Tensor):
            raise TypeError(
                f"exit {i} at {self.exit_paths[i]!r}: the module output is {shape_of(feat)}, not a tensor; "
                "attach the exit to a submodule that returns the feature map"
            )
        if extra is not None:
            extra = self._adapt_extra(module, extra)
        try:
            return module(feat, extra=extra) if extra is not None else module(feat)
        except (ValueError, TypeError, RuntimeError) as e:
            shape = tuple(feat.shape)
            extra_s = f" and extra {tuple(extra.shape)} from {self.extra_paths[i]!r}" if extra is not None else ""
            cfg = getattr(module, "config", None)
            want = ""
            if cfg is not None and hasattr(cfg, "feature_size") and (
                    len(shape) != 4 or (shape[1], *shape[2:]) != (cfg.in_channels, *cfg.feature_size)):
                want = (f"; the exit's config expects C={cfg.in_channels}, (H, W)={tuple(cfg.feature_size)} "
                        f"but the actual feature shape is C={shape[1] if len(shape) > 1 else '?'}, "
                        f"(H, W)={shape[2:]} - build the exit config from the actual shape")
            raise type(e)(
                f"exit {i} at {self.exit_paths[i]!r} failed on features of shape {shape}{extra_s}: {e}{want}"
            ) from e

    @staticmethod
    def _adapt_extra(module: nn.Module, extra: Tensor) -> Tensor:
        cfg = getattr(module, "config", None)
        tokens = getattr(cfg, "extra_tokens", 0) if cfg is not None else 0
        if tokens and isinstance(extra, Tensor) and extra.dim() == 2:
            return extra.reshape(extra.shape[0], tokens, -1)
        return extra

    def exit_forward(self, i: int, features: Any) -> Tensor:
        """Run exit ``i`` on an element of :meth:`branch_features` (a tensor or ``(features, extra)``)."""
        if isinstance(features, (tuple, list)):
            feat, extra = features
        else:
            feat, extra = features, None
        return self._call_exit(i, feat, extra)

    def _hooked_modules(self) -> dict[str, nn.Module]:
        """``{path: module}`` of every watched module, looked up now (a submodule replaced after
        construction is watched too: ``watching`` puts the dispatching hook on it)."""
        return {p: self.backbone.get_submodule(p) for p in self._watched_paths}

    def _run(self, inputs: tuple, on_ready, on_output=None) -> Any:
        """Run the backbone with hooks. ``on_ready(i, feat, extra)`` is called when exit i's inputs exist;
        ``on_output(path, output)`` may return a replacement output of a hooked module."""
        captured: dict[str, Any] = {}
        versions: dict[str, Any] = {}  # tensor version counters at capture: detects later in-place edits
        calls: dict[str, int] = {}
        done = [False] * self.num_exits
        next_exit = [0]
        needed_by = self._needed_by

        def hook(path):
            def fn(output):
                calls[path] = calls.get(path, 0) + 1
                if calls[path] > 1:
                    raise RuntimeError(
                        f"module {path!r} ran more than once in one forward pass (e.g. a shared ReLU); "
                        "attach exits to modules that run once"
                    )
                if path in needed_by:
                    captured[path] = output
                    versions[path] = _version_of(output)
                    for i in needed_by[path]:
                        p, e = self.exit_modules[i], self.extra_paths[i]
                        if done[i] or p not in captured or (e and e not in captured):
                            continue
                        if i != next_exit[0]:
                            raise RuntimeError(
                                f"exit {i} at {p!r} became ready before exit {next_exit[0]} at "
                                f"{self.exit_paths[next_exit[0]]!r}: the backbone does not run the exit points in "
                                "the order of its module tree"
                            )
                        for q in (p, e):
                            if q and _version_of(captured[q]) != versions[q]:
                                raise RuntimeError(
                                    f"the output of {q!r} was modified in place (e.g. by an in-place ReLU) before "
                                    f"exit {i} at {self.exit_paths[i]!r} could read it; attach the exit elsewhere"
                                )
                        done[i] = True
                        next_exit[0] += 1
                        on_ready(i, captured[p], captured[e] if e else None)
                if on_output is not None:
                    return on_output(path, output)
                return None

            return fn

        with watching({m: hook(p) for p, m in self._hooked_modules().items()}):
            final = self.backbone(*inputs)
        missing = [self.exit_paths[i] for i in range(self.num_exits) if not done[i]]
        if missing:
            raise RuntimeError(f"exit module path(s) {missing} did not run during the backbone's forward pass")
        return final

    def forward(self, *inputs: Any, extra: Mapping[str, Tensor] | Tensor | None = None) -> list[Tensor]:
        """Every exit's output (in depth order) followed by the backbone's final output.

        ``extra``: inputs of exits whose extra input is not a backbone module (see :meth:`early_exit`).
        """
        inputs = _as_inputs(inputs[0]) if len(inputs) == 1 else inputs
        B = _batch_of(inputs)
        if B == 0:
            return self._empty_outputs(inputs, extra)
        outs: list[Tensor | None] = [None] * self.num_exits
        user = self._user_extras(extra, B)

        def on_ready(i, feat, extra_t):
            outs[i] = self._call_exit(i, feat, user.get(i) if extra_t is None else extra_t)

        final = self._run(inputs, on_ready)
        return [*outs, final]

    def _empty_outputs(self, inputs: tuple, extra: Any) -> list[Tensor]:
        """``net(x)`` for an empty batch: every output with 0 rows. Shapes and dtypes come from a batch-1
        run on fake tensors (nothing is computed, and neither backbone nor exits need to accept B=0)."""
        def one(t: Any) -> Any:
            if isinstance(t, Tensor) and t.dim() > 0:
                return torch.empty((1, *t.shape[1:]), dtype=t.dtype, device="meta")
            if isinstance(t, Mapping):
                return {k: one(v) for k, v in t.items()}
            return t

        specs: list[tuple] = []
        probe(self, [one(t) for t in inputs], [""], kwargs={"extra": one(extra)},
              on_output=lambda _p, outs: specs.extend((tuple(o.shape), o.dtype) for o in outs))
        device = next((t.device for t in inputs if isinstance(t, Tensor)), torch.device("cpu"))
        return [torch.empty((0, *shape[1:]), dtype=dtype, device=device) for shape, dtype in specs]

    def branch_features(self, *inputs: Any, extra: Mapping[str, Tensor] | Tensor | None = None) -> list[Any]:
        """The inputs of every exit (detached copies), then the final output.

        Element i is the feature tensor feeding exit i, or ``(features, extra)`` for an exit with an extra
        input; :meth:`exit_forward` runs exit i on it. Use it to cache features for exit training.
        """
        inputs = _as_inputs(inputs[0]) if len(inputs) == 1 else inputs
        feats: list[Any] = [None] * self.num_exits
        user = self._user_extras(extra, _batch_of(inputs))

        def on_ready(i, feat, extra):
            extra = user.get(i) if extra is None else extra
            f = feat.detach().clone() if isinstance(feat, Tensor) else feat
            feats[i] = f if extra is None else (f, extra.detach().clone())

        with torch.no_grad():
            final = self._run(inputs, on_ready)
        return [*feats, final]

    @torch.no_grad()
    def feature_shapes(self, *inputs: Any) -> dict[str, Any]:
        """``{module path: output shape}`` of every exit's (and extra's) module for ``inputs``.

        Cheap: runs under ``FakeTensorMode`` (no real arithmetic), so use any input size.
        """
        inputs = _as_inputs(inputs[0]) if len(inputs) == 1 else inputs
        return probe(self.backbone, inputs, sorted(self._hooked_modules()))

    def validate(self, *inputs: Any) -> dict[str, Any]:
        """Check every exit's config against the actual feature shapes for ``inputs`` (shapes only, cheap).

        Raises ``ValueError`` listing each exit whose ``in_channels``/``feature_size`` does not match the
        feature map it will read, with the actual shape; returns ``{module path: shape}`` otherwise.
        """
        shapes = self.feature_shapes(*inputs)
        problems = []
        for i, (key, module) in enumerate(self.exits.items()):
            cfg = getattr(module, "config", None)
            shape = shapes.get(self.exit_modules[i])
            if cfg is None or not hasattr(cfg, "feature_size") or not isinstance(shape, tuple) or len(shape) != 4:
                continue
            if (shape[1], *shape[2:]) != (cfg.in_channels, *cfg.feature_size):
                problems.append(
                    f"exit {i} at {self.exit_paths[i]!r}: actual feature shape {shape} (C={shape[1]}, "
                    f"H x W={shape[2]}x{shape[3]}) but the config expects C={cfg.in_channels}, "
                    f"H x W={cfg.feature_size[0]}x{cfg.feature_size[1]}"
                )
        if problems:
            raise ValueError("exit configs do not match the backbone's feature shapes:\n  " + "\n  ".join(problems))
        return shapes

    # -- early exit ------------------------------------------------------------------------------
    @torch.no_grad()
    def early_exit(self, x: Any, policy: Any, extra: Mapping[str, Tensor] | Tensor | None = None) -> EarlyExitResult:
        """Per-sample early exit with batch compaction; see the module docstring.

        ``x``: the backbone input (a tensor, or a tuple of tensors passed as ``backbone(*x)``).
        ``policy``: a :mod:`slvit_fast.policies` policy. ``extra``: extra inputs for exits that are not
        fed from a backbone module - ``{exit path: tensor (B, ...)}``, or a tensor when exactly one exit
        takes an extra input.
        """
        return run_early_exit(self, x, policy, extra)

    def _flop_costs(self, sizes: tuple) -> tuple[list[float], float]:
        """FLOPs per sample answered at each exit (accounting's ``cost_flops``) and of the plain backbone,
        for per-sample input ``sizes``: counted on fake tensors once per size, then cached."""
        if sizes not in self._cost_cache:
            from .accounting import summary

            s = summary(self, list(sizes))
            self._cost_cache[sizes] = ([float(r.cost_flops) for r in s.rows], float(s.backbone_flops))
        return self._cost_cache[sizes]

    def _user_extras(self, extra: Any, B: int) -> dict[int, Tensor]:
        need = [i for i, e in enumerate(self.extra_paths) if e is None and getattr(
            getattr(self.exits[_sanitize(self.exit_paths[i])], "config", None), "extra_dim", 0)]
        if extra is None:
            return {}
        if isinstance(extra, Tensor):
            if len(need) != 1:
                raise ValueError(f"extra= as a tensor needs exactly one exit taking user extras; found {len(need)}; "
                                 "pass {exit path: tensor}")
            extra = {self.exit_paths[need[0]]: extra}
        out = {}
        for path, t in dict(extra).items():
            if path not in self.exit_paths:
                raise ValueError(f"extra= key {path!r} is not an exit path; exit paths: {self.exit_paths}")
            if t.shape[0] != B:
                raise ValueError(f"extra for {path!r} has batch {t.shape[0]}, the input has {B}")
            out[self.exit_paths.index(path)] = t
        return out
