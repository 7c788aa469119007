"""ONNX export of a deployable module, checked by running the written file in ONNX Runtime.

The file only reaches `out` after `onnx.checker` and the parity check pass: it is written to a
temporary name beside `out` first, and kept as `<out>.failed` when parity fails, so a script that
finds a file at `out` can trust it.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from compress.errors import CheckFailed, CompressError
from compress.tokens import index_output_names, returning_indices
from export.files import failed_path, keep_failed, print_note, temp_beside
from export.onnx_file import (
    input_size_of,
    load_graph_only,
    one_line,
    prop,
    require_batch_size,
    set_metadata,
    shape_of,
    spec_metadata,
    strip_trace_metadata,
)
from export.parity import (
    FP32_TOLERANCE,
    Float64Reference,
    Parity,
    check_parity,
    index_agreement,
    parity_batches,
    torch_reference,
)
from export.result import ExportResult

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
MIN_OPSET = 14
DYNAMO_MIN_OPSET = 18  # older opsets come from the TorchScript exporter
MAX_DYNAMIC_BATCH = 4096
PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2  # a single-file ONNX model must stay under 2 GiB


def to_onnx(module: torch.nn.Module, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
            batch_size: int | None = 1, dynamic_batch: bool = False, check: bool = True, data=None,
            metadata: dict[str, Any] | None = None, simplify: bool = True, exporter: str = "auto",
            tolerance: float = FP32_TOLERANCE, log: Callable[[str], None] | None = None,
            token_indices: bool = True) -> ExportResult:
    """Export `module` (a DeployableModule: float images in [0, 1], NCHW) to an ONNX file at `out`.

    `dynamic_batch` makes the batch dimension symbolic; otherwise it is fixed to `batch_size`.
    `exporter` is "auto" (dynamo, falling back to TorchScript with the reason logged), "dynamo"
    or "torchscript". `data` (a compress.data.DataBundle) adds real validation images to the
    parity check. Raises CheckFailed when parity fails (file kept as `<out>.failed`).

    A token-sparse module (compress/tokens) gets extra int64 outputs after the logits, each stage's
    kept patch indices, and parity then also requires them identical to PyTorch's; `token_indices=False`
    leaves them out (a TensorRT engine here has one output).
    """
    log = log or print_note
    out = Path(out)
    input_size = input_size_of(module)
    batch_size = _check_args(opset, batch_size, dynamic_batch, exporter, input_size)
    _refuse_huge(module)
    props = {**spec_metadata(module), **{k: prop(v) for k, v in (metadata or {}).items()}}
    extra_outputs = index_output_names(module) if token_indices else []
    tmp = temp_beside(out)
    started = time.perf_counter()
    was_training = module.training
    module.eval()
    try:
        with returning_indices(module, bool(extra_outputs)):
            used, notes = export_graph(module, tmp, input_size, opset=opset, batch_size=batch_size,
                                       dynamic_batch=dynamic_batch, exporter=exporter, log=log,
                                       output_names=[OUTPUT_NAME, *extra_outputs])
        model = _load_checked(tmp)
        strip_trace_metadata(model)
        set_metadata(model, props)
        parity, simplified = None, False
        if not check:
            notes.append("parity not checked (--no-check)")
            if simplify:
                notes.append("not simplified: onnxslim output is kept only when parity is checked")
            save_model(model, tmp)
        else:
            batches, described = parity_batches(input_size, None if dynamic_batch else batch_size, data)
            reference = torch_reference(module)
            exact = Float64Reference(module, batches)
            indices = _index_reference(module) if extra_outputs else None
            if simplify:
                parity, simplified = _try_simplified(model, tmp, reference, batches, described, tolerance, notes, log,
                                                     indices, exact)
            if not simplified:
                save_model(model, tmp)
                parity = _parity_of_file(tmp, reference, batches, described, tolerance, indices, exact)
            if parity.passed and parity.cause:
                notes.append(f"parity against PyTorch float64: {parity.cause}")
            if not parity.passed:
                failed = keep_failed(tmp, out)
                raise CheckFailed(f"parity check failed for {out.name}: {parity.summary()}; "
                                  f"the file is kept at {failed} and nothing was written to {out}")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        module.train(was_training)
    failed_path(out).unlink(missing_ok=True)
    return _result(out, used, opset, parity, time.perf_counter() - started, simplified, notes, props)


# ------------------------------------------------------------------ export


def export_graph(module: torch.nn.Module, path: Path, input_size: tuple[int, int, int], *, opset: int,
                 batch_size: int, dynamic_batch: bool, exporter: str = "auto",
                 log: Callable[[str], None] = print, output_names: Sequence[str] = (OUTPUT_NAME,)
                 ) -> tuple[str, list[str]]:
    """Write the raw ONNX graph to `path`; returns the exporter used and notes about the export."""
    notes: list[str] = []
    device = _device(module)
    if exporter in ("auto", "dynamo"):
        try:
            _dynamo_export(module, path, input_size, opset, batch_size, dynamic_batch, device, output_names)
            return "dynamo", notes
        except Exception as exc:
            reason = one_line(exc)
            if exporter == "dynamo":
                raise CompressError(f"the dynamo ONNX exporter failed: {reason}") from None
            log(f"dynamo exporter failed ({reason}); falling back to the TorchScript exporter")
            notes.append(f"dynamo exporter failed ({reason}); used the TorchScript exporter")
    try:
        _torchscript_export(module, path, input_size, opset, batch_size, dynamic_batch, device, output_names)
    except Exception as exc:
        raise CompressError(f"ONNX export failed: {'; '.join(notes + [f'torchscript: {one_line(exc)}'])}") from None
    return "torchscript", notes


def _dynamo_export(module, path, input_size, opset, batch_size, dynamic_batch, device, output_names) -> None:
    if opset < DYNAMO_MIN_OPSET:  # it would quietly write opset 18 when version conversion fails
        raise ValueError(f"it writes opset {DYNAMO_MIN_OPSET} or newer, and --opset {opset} was asked for")
    # Tracing at batch 2 keeps torch.export from specialising a symbolic batch of 1 to a constant.
    example = _example(input_size, 2 if dynamic_batch else batch_size, device)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(output_names), dynamic_shapes=dynamic_shapes,
                          external_data=False, verbose=False)
    written = _opset_of(onnx.load(str(path), load_external_data=False), -1)
    if written != opset:
        raise ValueError(f"it wrote opset {written} instead of the requested {opset}")


def _torchscript_export(module, path, input_size, opset, batch_size, dynamic_batch, device, output_names) -> None:
    example = _example(input_size, batch_size, device)
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *output_names)} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=list(output_names), dynamic_axes=axes,
                          do_constant_folding=True)


def _example(input_size, batch_size: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((batch_size, *input_size), generator=g).to(device)


def _load_checked(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise CheckFailed(f"onnx.checker rejected the exported graph: {one_line(exc)}") from None
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Serialise `model` to `path` as one self-contained file."""
    onnx.save_model(model, str(path))


# ------------------------------------------------------------------ simplification and parity


def _try_simplified(model, tmp, reference, batches, described, tolerance, notes, log,
                    indices=None, exact=None) -> tuple[Parity | None, bool]:
    """Save the onnxslim-simplified model at `tmp` if it checks and keeps parity; else report why not."""
    import onnxslim

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slim = onnxslim.slim(model)
        onnx.checker.check_model(slim)
    except Exception as exc:
        reason = f"onnxslim failed ({one_line(exc)}); kept the unsimplified graph"
        log(reason)
        notes.append(reason)
        return None, False
    set_metadata(slim, {p.key: p.value for p in model.metadata_props})
    save_model(slim, tmp)
    parity = _parity_of_file(tmp, reference, batches, described, tolerance, indices, exact)
    if parity.passed:
        return parity, True
    reason = f"onnxslim output broke parity ({parity.summary()}); kept the unsimplified graph"
    log(reason)
    notes.append(reason)
    return None, False


def _parity_of_file(path: Path, reference, batches, described: str, tolerance: float, indices=None,
                    exact: Float64Reference | None = None) -> Parity:
    """Logits parity of the file at `path`; with `indices` (PyTorch's kept-token indices) those too; with
    `exact`, a failed fp32 comparison is redone against float64 (parity.py)."""
    runner = OnnxRunner(path, spin=False)
    parity = check_parity(reference, runner, batches, tolerance=tolerance,
                          inputs=f"{described}, onnxruntime vs pytorch")
    if not parity.passed and exact is not None:
        parity = exact.recheck(parity, runner, batches)
    if indices is not None:
        parity = parity.with_indices(index_agreement(indices, lambda x: runner.outputs(x)[1:], batches))
    return parity


def _index_reference(module: torch.nn.Module) -> Callable[[np.ndarray], list[np.ndarray]]:
    """PyTorch's kept-token indices of a token-sparse module, numpy → list of [N, k] arrays."""

    def run(x: np.ndarray) -> list[np.ndarray]:
        with returning_indices(module), torch.inference_mode():
            return [t.numpy() for t in module(torch.from_numpy(x))[1:]]

    return run


# ------------------------------------------------------------------ running and inspecting files


class OnnxRunner:
    """An ONNX Runtime session on an exported file that refuses inputs of the wrong shape up front.

    `threads=0` lets ONNX Runtime use one thread per physical core; providers are explicit
    (deploy.md), CPU unless given. `spin=False` stops idle worker threads from busy-waiting, which
    on a shared, oversubscribed machine makes a check minutes slower (timing runs keep the default).
    """

    def __init__(self, path: str | os.PathLike, *, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",), spin: bool = True):
        ort = import_onnxruntime()
        self.path = Path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options, providers=list(providers))
        except Exception as exc:
            raise CompressError(f"onnxruntime cannot load {self.path}: {one_line(exc)}") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_shape = tuple(d if isinstance(d, int) else str(d) for d in first.shape)
        self.output_name = self.session.get_outputs()[0].name

    @property
    def batch_size(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is symbolic."""
        return self.input_shape[0] if isinstance(self.input_shape[0], int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x, [self.output_name])[0]

    def outputs(self, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """The named outputs (all by default; the logits come first) for input batch `x`."""
        require_batch_size(self.input_shape, x.shape[0], self.path)
        fixed = [(i, d) for i, d in enumerate(self.input_shape) if isinstance(d, int) and i > 0]
        if x.ndim != len(self.input_shape) or any(x.shape[i] != d for i, d in fixed):
            raise CompressError(f"{self.path.name} takes input {list(self.input_shape)}, got {list(x.shape)}")
        return self.session.run(names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})


def import_onnxruntime():
    """onnxruntime, or one line saying which extra installs it: the CPU and GPU wheels are the same
    module and must never be installed together, so neither is a base dependency (docs/export.md)."""
    try:
        import onnxruntime
    except ImportError:
        raise CompressError('ONNX Runtime is not installed: pip install -e ".[cpu]" (or ".[gpu]" on a CUDA '
                            "machine)") from None
    return onnxruntime


# ------------------------------------------------------------------ helpers


def _check_args(opset: int, batch_size: int | None, dynamic_batch: bool, exporter: str,
                input_size: tuple[int, int, int]) -> int:
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise CompressError(f"exporter must be auto, dynamo or torchscript, got {exporter!r}")
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise CompressError(f"--opset {opset} is out of range ({MIN_OPSET}..{newest}; default {DEFAULT_OPSET})")
    if dynamic_batch:
        return batch_size or 1
    if batch_size is None or batch_size < 1:
        raise CompressError(f"--batch-size must be a positive integer, got {batch_size}")
    return batch_size


def _refuse_huge(module: torch.nn.Module) -> None:
    n_bytes = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    if n_bytes > PROTOBUF_LIMIT:
        raise CompressError(f"the model holds {n_bytes / 1024**3:.1f} GiB of weights; single-file ONNX is "
                            "limited to 2 GiB")


def _device(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def _result(out: Path, exporter: str, opset: int, parity: Parity | None, seconds: float, simplified: bool,
            notes: list[str], props: dict[str, str]) -> ExportResult:
    model = load_graph_only(out)
    return ExportResult(path=out, format="onnx", opset=_opset_of(model, opset), exporter=exporter,
                        input_names=[i.name for i in model.graph.input],
                        input_shapes=[shape_of(i) for i in model.graph.input],
                        output_names=[o.name for o in model.graph.output],
                        output_shapes=[shape_of(o) for o in model.graph.output],
                        size_bytes=out.stat().st_size, parity=parity, build_time_s=round(seconds, 3),
                        precision="fp32", simplified=simplified, notes=notes, metadata=props)


def _opset_of(model: onnx.ModelProto, default: int) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default)
