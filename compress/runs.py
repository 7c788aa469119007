"""Run directories (design.md): model.json + weights-only model.pt + report.json, written atomically.

`load` rebuilds the deployable module from the JSON spec alone: the dense architecture comes from
the model registry, slimmed layer shapes from spec["layers"], token sparsification (prediction
modules and keep schedule) from spec["tokens"], the prompt from spec["prompt"].
No pickled code is ever read.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compress import __version__
from compress.deploy import DeployableModule
from compress.errors import CompressError

SPEC_FORMAT = 1


def build_spec(model: str, num_classes: int, input_size: tuple[int, int, int], mean, std, *,
               adapt: str | None, data: str, classes: list[str] | None = None) -> dict[str, Any]:
    """The model.json of a dense model; pruning adds "layers"/"widths", prompting "prompt", tokens "tokens"."""
    return {
        "format": SPEC_FORMAT,
        "model": model,
        "num_classes": int(num_classes),
        "input_size": [int(v) for v in input_size],
        "in_chans": int(input_size[0]),
        "normalization": {"mean": [float(v) for v in mean], "std": [float(v) for v in std]},
        "adapt": adapt,
        "data": data,
        "classes": classes,
        "layers": {},
        "widths": {},
        "prompt": None,
    }


def build_module(spec: dict[str, Any], dense: torch.nn.Module | None = None) -> DeployableModule:
    """An untrained deployable module with exactly the architecture `spec` describes; `dense`, when given,
    is the dense network of spec's model to start from instead of building it (e.g. a shape-only copy)."""
    from compress.models import create_model

    try:
        net = dense if dense is not None else create_model(spec["model"], num_classes=spec["num_classes"],
                                                            image_size=spec["input_size"][1], adapt=spec.get("adapt"))
        if spec.get("layers"):
            from compress.pruning.structure import apply_layer_spec

            apply_layer_spec(net, spec["layers"])
        if spec.get("tokens"):
            from compress.tokens import sparsify_from_spec

            net = sparsify_from_spec(net, spec["tokens"])
        prompt = None
        if spec.get("prompt"):
            from compress.prompt import build_prompt

            prompt = build_prompt(spec["prompt"])
    except KeyError as exc:
        raise CompressError(f"model.json is missing the key {exc}") from None
    norm = spec["normalization"]
    return DeployableModule(net, norm["mean"], norm["std"], prompt=prompt, input_size=spec["input_size"])


def is_run(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "model.json").is_file() and (p / "model.pt").is_file()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CompressError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CompressError(f"{path} is not valid JSON ({exc})") from None


def read_spec(run_dir: str | os.PathLike) -> dict[str, Any]:
    p = Path(run_dir)
    if not p.is_dir():
        raise CompressError(f"run directory {p} does not exist")
    if not is_run(p):
        raise CompressError(f"{p} is not a run directory (needs model.json and model.pt, "
                            "written by `compress train` or `compress prune`)")
    spec = read_json(p / "model.json")
    if spec.get("format") != SPEC_FORMAT:
        raise CompressError(f"{p / 'model.json'} has format {spec.get('format')!r}; this version reads {SPEC_FORMAT}")
    return spec


def read_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(run_dir) / "report.json")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt archives
        raise CompressError(f"{path} is not a readable weights file ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from None


def weights_of(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """`module`'s state_dict on the CPU, with its per-module version metadata: some layers read it
    when loading (torchvision's MNASNet refuses a state_dict without it, ViT renames legacy keys)."""
    state = module.state_dict()
    out = OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items())
    out._metadata = copy.deepcopy(getattr(state, "_metadata", OrderedDict()))
    return out


def with_version_metadata(state: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`state` as loaded, or, where it carries no version metadata (a plain dict saved by older code or
    by hand), with `module`'s own: the weights were made for this code's layer versions."""
    if getattr(state, "_metadata", None) is not None:
        return state
    state = OrderedDict(state)
    state._metadata = copy.deepcopy(getattr(module.state_dict(), "_metadata", OrderedDict()))
    return state


def load(run_dir: str | os.PathLike) -> DeployableModule:
    """Rebuild the deployable module of a run directory, in eval mode, in any fresh process."""
    spec = read_spec(run_dir)
    module = build_module(spec)
    state = with_version_metadata(load_state(Path(run_dir) / "model.pt"), module)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()), str(exc))
        raise CompressError(f"model.pt does not match model.json in {run_dir}: {first}") from None
    module.spec = spec
    return module.eval()


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Fail fast (before any training) if a run directory cannot be written at `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (is_run(out) or not any(out.iterdir()))):
        raise CompressError(f"--out {out} exists and is not a run directory; choose another path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent)
        os.rmdir(probe)
    except OSError as exc:
        raise CompressError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return out


def write_run(out_dir: str | os.PathLike, module: DeployableModule, spec: dict[str, Any],
              report: dict[str, Any], extras: dict[str, dict[str, torch.Tensor]] | None = None,
              files: dict[str, bytes] | None = None) -> Path:
    """Write a run directory under a temporary name, then rename it into place.

    `extras` are further weights-only files (e.g. a PASS hypernetwork as "hypernet.pt"); `files` any
    other files, as bytes (e.g. a plot of the method's search).

    An existing *run* directory at `out_dir` is replaced; any other existing path is refused, so
    a typo can never delete user data.
    """
    out = check_out_dir(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        report = {"version": __version__, **report}
        (tmp / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        torch.save(weights_of(module), tmp / "model.pt")
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for name, payload in (extras or {}).items():
            torch.save(payload, tmp / name)
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "run")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class Stopwatch:
    """Wall time of named stages, recorded into report.json."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str, since: float) -> float:
        self.stages[name] = round(time.perf_counter() - since, 3)
        return self.stages[name]

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 3)


KEY_FILE = "study.json"   # in each run the study made: the settings it was made with


class NotRun(Exception):
    """A run `--only-done` leaves out: it was not made (or not with these settings)."""


def reuse_or_run(out: Path, key: dict[str, Any], run: Callable[[], dict[str, Any]], *, fresh: bool = False,
                 marker: str = KEY_FILE, only_done: bool = False) -> tuple[dict[str, Any], bool]:
    """`out`'s report if it is a run made with the same `key` (recorded in `out/marker`), else `run()`'s,
    its key recorded: a repeated study redoes only what changed (an interrupted run resumes from its
    checkpoint when `run` passes resume="auto"). Returns (report, reused). Only rank 0 writes.
    `only_done`: raise NotRun instead of running (a report of what several partial runs, or processes
    that ran the cells side by side, have made)."""
    from compress.runtime import current

    if not fresh and is_run(out) and read_key(out, marker) == key:
        return read_report(out), True
    if only_done:
        raise NotRun(str(out))
    report = run()
    if current().is_main:
        (out / marker).write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
    current().barrier()
    return report, False


def read_key(run: Path, marker: str = KEY_FILE) -> dict | None:
    try:
        return json.loads((run / marker).read_text())
    except (OSError, json.JSONDecodeError):
        return None
