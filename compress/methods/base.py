"""The interface every pruning method implements, and the registry `compress prune --method` reads.

A method only *decides what to keep*: it gets a `PruneContext` (the dense deployable module, data,
channel groups, the cost model the target is counted in — FLOPs or latency measured on the target —
and the target) and returns a `SearchResult` — per-unit scores (the pipeline turns them into masks
that hit the target, confirmed with real fvcore or by timing the slim model) or final masks, plus
optionally a visual prompt and extra files. Slimming, fine-tuning and writing the run directory are
the common pipeline's job (compress/pipeline.py); every training-like step a method takes runs through
the shared loop (compress/loop.py: a `Stage` subclass and `run_stage`), so it runs on every device, under
torchrun and resumes from checkpoints.

New methods plug in without touching this package's code: put a module in compress/methods/ that
defines a `Method` subclass decorated with `@register`; its `options` become `compress prune` flags.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from compress.errors import CompressError
from compress.prompt import PROMPT_KINDS


@dataclass(frozen=True)
class MethodOption:
    """One method-specific `compress prune` flag, e.g. MethodOption("--lbi-epochs", int, 5, "…")."""

    flag: str
    type: Any                     # int, float, str, bool (an on/off flag) or a tuple of choices
    default: Any
    help: str

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# The visual-prompt flags of every prompted method (vpns, pass): one declaration, so one meaning.
PROMPT_OPTIONS = (
    MethodOption("--prompt", PROMPT_KINDS, "pad", "visual prompt kind, trained with the search and deployed "
                 "(pad: learnable frame added over the image's border at full resolution, the VPNs reference; "
                 "resize-pad: image shrunk to make room for the frame; additive: full-frame delta; none: the same "
                 "search without a prompt, and for pass a hypernetwork that starts from a zero state)"),
    MethodOption("--prompt-size", int, None, "pad prompt frame width in px  [default: 16 px at 224 px, scaled]"),
)


@dataclass
class PruneContext:
    """What a method's search sees. `module` is the dense, trained deployable module: a method may
    train it in place (weights, prompt) but must leave no hooks on it."""

    module: nn.Module
    data: Any                     # compress.data.DataBundle
    groups: list                  # list[ChannelGroup], in execution order, on module.net
    cost_model: Any               # compress.pruning.cost.CostModel the target is counted in (FLOPs or latency)
    ratio: float                  # the target: pruned ÷ dense cost (--flops-ratio or --latency-ratio)
    scope: str
    round_to: int
    seed: int
    lr: float
    batch_size: int
    stopwatch: Any                # compress.runs.Stopwatch (stages are recorded in report.json)
    checkpoint: Any = None        # compress.checkpoint.Checkpoint: pass it to run_stage so searches resume
    allocation: str = "rank"      # how target selection allocates widths: "rank" or "knapsack"
    report: dict[str, Any] = field(default_factory=dict)   # method-specific keys for report.json
    # When sparse training ran before the search: the dense weights' rankings ("l1", "group_l2"), so a method
    # whose first scores are one of them can still report how far it moved from them (initial_masks).
    before_sparse: dict[str, dict[str, torch.Tensor]] | None = None

    def select_masks(self, scores: dict[str, torch.Tensor], ratio: float | None = None, normalize: bool = True,
                     tolerance: float | None = None) -> dict[str, torch.Tensor]:
        """Masks hitting the (or another) cost ratio by the cost model, with this run's scope, round-to and
        allocation."""
        from compress.pruning.target import TOLERANCE, select_masks

        return select_masks(scores, self.groups, self.cost_model, self.ratio if ratio is None else ratio,
                            scope=self.scope, round_to=self.round_to, normalize=normalize,
                            allocation=self.allocation, tolerance=TOLERANCE if tolerance is None else tolerance)

    def gates(self):
        """Gate hooks on the module's network (use as a context manager so they are removed)."""
        from compress.pruning.gates import Gates

        return Gates(self.module.net, self.groups)


@dataclass
class SearchResult:
    """What a method found. Give `scores` (preferred: the pipeline selects masks for the target and
    confirms the ratio with fvcore or a measurement, refining if the estimate was off) or final `masks`."""

    scores: dict[str, torch.Tensor] | None = None
    masks: dict[str, torch.Tensor] | None = None
    normalize: bool = True                       # rank scores normalised per group (global scope)
    prompt: nn.Module | None = None              # a visual prompt to deploy in front of the network
    prompt_spec: dict[str, Any] | None = None    # model.json "prompt" (compress.prompt.build_prompt)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)    # per stage: wall_s, accuracies…
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # extra weights-only files
    # The masks the method's *initial* scores give at the same target (before any search or sparse training):
    # report.json's "mask_overlap" says how far the search moved from them.
    initial_masks: dict[str, torch.Tensor] | None = None
    files: dict[str, bytes] = field(default_factory=dict)   # other files for the run directory (a plot)


class Method:
    """Base class: set `name`, `summary`, `options`; implement `search`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[MethodOption, ...]] = ()
    prunes_channels: ClassVar[bool] = True      # False: no channel target (dynamicvit prunes tokens only)

    def __init__(self, **options: Any):
        known = {o.dest: o for o in self.options}
        for key in options:
            if key not in known:
                raise CompressError(f"method {self.name} has no option {key!r}")
        self.config = {dest: options.get(dest, o.default) for dest, o in known.items()}

    def search(self, ctx: PruneContext) -> SearchResult:
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}
BROKEN: dict[str, str] = {}   # module name -> import error


def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"two pruning methods are named {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


def discover() -> dict[str, type[Method]]:
    """Import every module of compress.methods so their @register decorators run; the registry.

    A module that fails to import is remembered in BROKEN (named by `get_method`) instead of
    breaking every other method.
    """
    import compress.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "base" or info.name in BROKEN:
            continue
        try:
            importlib.import_module(f"compress.methods.{info.name}")
        except Exception as exc:  # a broken plugin must not take the baselines down
            BROKEN[info.name] = f"{type(exc).__name__}: {exc}"
    return METHODS


def get_method(name: str) -> type[Method]:
    methods = discover()
    if name not in methods:
        hint = "".join(f"; compress.methods.{mod} failed to import ({err})" for mod, err in BROKEN.items()
                       if mod.rstrip("_") == name)
        raise CompressError(f"unknown method {name!r}; choose one of: {', '.join(sorted(methods))}{hint}")
    return methods[name]


def list_methods() -> list[str]:
    return sorted(discover())


def all_options() -> list[tuple[str, MethodOption]]:
    """(method name, option) for every registered method, flags unique across methods."""
    seen: dict[str, str] = {}
    out = []
    for name in sorted(discover()):
        for opt in METHODS[name].options:
            if opt.flag in seen and seen[opt.flag] != name:
                # Two methods may share a flag only if they declare it identically.
                first = next(o for n, o in out if o.flag == opt.flag)
                if (first.type, first.default) != (opt.type, opt.default):
                    raise ValueError(f"methods {seen[opt.flag]} and {name} declare {opt.flag} differently")
                continue
            seen[opt.flag] = name
            out.append((name, opt))
    return out
