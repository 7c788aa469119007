"""What an export produced: one record for ONNX files and TensorRT engines, printed and written as JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.parity import Parity


@dataclass
class ExportResult:
    path: Path
    format: str  # "onnx" | "tensorrt"
    opset: int | None  # of the ONNX file (for an engine: of the ONNX it was built from)
    exporter: str | None  # "dynamo" | "torchscript"; None for an engine built from a given ONNX file
    input_names: list[str]
    input_shapes: list[list[int | str]]
    output_names: list[str]
    output_shapes: list[list[int | str]]
    size_bytes: int
    parity: Parity | None  # None when the check was skipped (--no-check)
    build_time_s: float
    precision: str = "fp32"  # "fp32" | "fp16"
    simplified: bool = False  # onnxslim output kept (it passed parity)
    notes: list[str] = field(default_factory=list)  # fallbacks taken, checks skipped
    metadata: dict[str, str] = field(default_factory=dict)
    backend_version: str | None = None  # TensorRT version for engines
    batch_profile: list[int] | None = None  # TensorRT [min, opt, max] batch when the batch is dynamic

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        out["parity"] = self.parity.to_dict() if self.parity else None
        return out

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs for a compact table."""
        rows = [("file", str(self.path)), ("format", f"{self.format} ({self.precision})"),
                ("size", _size(self.size_bytes))]
        if self.opset is not None:
            rows.append(("opset", str(self.opset)))
        if self.exporter:
            rows.append(("exporter", self.exporter + (" + onnxslim" if self.simplified else "")))
        if self.backend_version:
            rows.append(("backend", self.backend_version))
        rows += [(f"input {n}", _dims(s)) for n, s in zip(self.input_names, self.input_shapes, strict=True)]
        rows += [(f"output {n}", _dims(s)) for n, s in zip(self.output_names, self.output_shapes, strict=True)]
        if self.batch_profile:
            rows.append(("batch profile", "min {} / opt {} / max {}".format(*self.batch_profile)))
        if self.parity is None:
            rows.append(("parity", "not checked"))
        else:
            p = self.parity
            rows += [("parity", "passed" if p.passed else "FAILED"),
                     ("max abs error", f"{p.max_abs:.3g}"),
                     ("max rel error", f"{p.max_rel:.3g} (tolerance {p.tolerance:g})"),
                     ("top-1 agreement", f"{p.top1_agreement:.2%} of {p.n_samples}"),
                     *([("kept-token indices", f"identical on {p.indices_agreement:.2%} of {p.n_samples}")]
                       if p.indices_agreement is not None else []),
                     ("compared on", p.inputs)]
        rows.append(("time", f"{self.build_time_s:.1f} s"))
        rows += [("note", n) for n in self.notes]
        return rows


def _dims(shape: list[int | str]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
