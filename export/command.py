"""`compress export DIR`: validate flags, load the run, export, print a compact table, write --json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from compress.errors import CompressError
from compress.files import write_atomic
from export.files import temp_beside
from export.result import ExportResult

TENSORRT_ONLY = ("fp16", "workspace", "timing_cache", "min_batch", "opt_batch", "max_batch")


def export_command(run_dir: str, *, fmt: str, out: str, opset: int, batch_size: int | None, dynamic_batch: bool,
                   fp16: bool, workspace: float | None, timing_cache: str | None, min_batch: int | None,
                   opt_batch: int | None, max_batch: int | None, data: str | None, no_check: bool,
                   no_simplify: bool, json_path: str | None) -> ExportResult:
    options = dict(fp16=fp16, workspace=workspace, timing_cache=timing_cache, min_batch=min_batch,
                   opt_batch=opt_batch, max_batch=max_batch)
    _check_flags(fmt, batch_size, dynamic_batch, options)
    if json_path:
        temp_beside(Path(json_path)).unlink()  # unwritable --json fails now, not after the export
    if fmt == "tensorrt":
        from export.tensorrt import require_tensorrt

        require_tensorrt()  # before loading anything: a missing GPU or package is a one-line exit 2
    module, metadata = _load_run(run_dir)
    bundle = _load_data(data, module) if data else None
    from compress.progress import console

    with console.status(f"exporting {run_dir} to {fmt}"):
        if fmt == "onnx":
            from export.onnx import to_onnx

            result = to_onnx(module, out, opset=opset, batch_size=batch_size or 1, dynamic_batch=dynamic_batch,
                             check=not no_check, data=bundle, metadata=metadata, simplify=not no_simplify)
        else:
            result = _tensorrt(module, out, opset, batch_size, dynamic_batch, options, not no_check, bundle)
    print_result(result)
    if json_path:
        write_atomic(Path(json_path), (json.dumps({"run": str(run_dir), **result.to_dict()}, indent=2) + "\n").encode())
    return result


def print_result(result: ExportResult, console: Console | None = None) -> None:
    table = Table(title=f"compress export → {escape(result.path.name)}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for label, value in result.rows():  # Text: shapes like "[batch, 3, 32, 32]" are not markup
        table.add_row(label, Text(value, style="green" if value == "passed" else ""))
    (console or Console()).print(table)


def _check_flags(fmt: str, batch_size: int | None, dynamic_batch: bool, options: dict) -> None:
    if batch_size is not None and dynamic_batch:
        raise CompressError("--batch-size and --dynamic-batch exclude each other: a file has a fixed or a "
                            "symbolic batch")
    if batch_size is not None and batch_size < 1:
        raise CompressError(f"--batch-size must be a positive integer, got {batch_size}")
    if fmt == "onnx":
        given = [k for k in TENSORRT_ONLY if options[k] not in (None, False)]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise CompressError(f"{flags} only appl{'ies' if len(given) == 1 else 'y'} to --format tensorrt")
    elif batch_size is not None and any(options[k] is not None for k in ("min_batch", "opt_batch", "max_batch")):
        raise CompressError("--batch-size fixes the batch; --min/--opt/--max-batch make it dynamic: use one or the "
                            "other")


def _load_run(run_dir: str):
    from compress.runs import is_run, load, read_report

    path = Path(run_dir)
    if path.is_file():
        raise CompressError(f"{path} is a file; `compress export` takes a run directory (written by train or prune)")
    module = load(path)
    metadata = {}
    if is_run(path) and (path / "report.json").is_file():
        from export.onnx_file import run_metadata

        metadata = run_metadata(read_report(path))
    return module, metadata


def _load_data(spec: str, module):
    from compress.data import load_data

    return load_data(spec, image_size=int(module.input_size[1]))


def _tensorrt(module, out, opset, batch_size, dynamic_batch, options, check, bundle) -> ExportResult:
    from export.tensorrt import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_GB, to_tensorrt

    lo, opt, hi = options["min_batch"], options["opt_batch"], options["max_batch"]
    if batch_size is not None:
        lo = hi = batch_size
    elif dynamic_batch or any(v is not None for v in (lo, opt, hi)):
        lo = lo or 1
        hi = hi or max(DEFAULT_MAX_BATCH, lo)
    else:
        lo = hi = 1
    workspace = options["workspace"] if options["workspace"] is not None else DEFAULT_WORKSPACE_GB
    return to_tensorrt(module, out, fp16=options["fp16"], workspace_gb=workspace,
                       timing_cache=options["timing_cache"], min_batch=lo, opt_batch=opt, max_batch=hi,
                       check=check, data=bundle, opset=opset)
