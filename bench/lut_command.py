"""`compress latency-table`: build (or reuse) a network's latency lookup tables on a target and print them,
with the tables' prediction for whole networks beside their measured latency."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.lut import DEFAULT_POINTS, BuildReport, build_latency_model
from bench.lut_cache import TableCache, TableTarget
from compress.errors import CompressError
from compress.pruning.latency_model import LatencyModel
from compress.pruning.latency_stages import STAGE_FRACTION

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def latency_table_command(*, model: str | None = None, source: str | None = None, image_size: int = 224,
                          num_classes: int = 1000, backend: str = "onnxruntime", threads: int | None = None,
                          batch_size: int = 1, precision: str = "fp32", clock: str = "wall", round_to: int = 8,
                          points: int = DEFAULT_POINTS, cache_dir: str | None = None, json_path: str | None = None,
                          out: Console | None = None) -> tuple[LatencyModel, BuildReport]:
    """Build or reuse the tables of `model` (or of the run at `source`) and print them."""
    from bench.command import _stdout
    from bench.host import physical_cores
    from compress.progress import console
    from compress.pruning.groups import find_groups

    out = out or _stdout()
    if points < 2:
        raise CompressError(f"--points must be at least 2 (the narrowest and the dense width), got {points}")
    if round_to < 1:
        raise CompressError(f"--round-to must be at least 1, got {round_to}")
    threads = threads or (1 if clock == "cpu" else physical_cores())
    target = TableTarget(backend=_backend(backend), threads=threads, batch_size=batch_size, precision=precision,
                         clock=clock)
    module = _module(model, source, image_size, num_classes)
    groups = find_groups(module.net, module.normalize(module.example_input(1)))
    if not groups:
        raise CompressError("this model has no prunable channel groups: there is nothing to tabulate")

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    latency, report = build_latency_model(module, groups, target, round_to=round_to, points=points,
                                          cache=TableCache(cache_dir), say=say)
    name = model or str(source)
    out.print(layer_table(latency, name))
    for line in summary_lines(latency, report):
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    if json_path:
        from compress.files import write_atomic

        write_atomic(Path(json_path), (json.dumps(table_json(latency, name, report), indent=1) + "\n").encode())
        out.print(f"wrote {json_path}", highlight=False)
    return latency, report


def _backend(name: str) -> str:
    from bench.backends import parse_backends

    names = parse_backends(name)
    if not names or len(names) != 1:
        raise CompressError(f"--backend takes one backend, got {name!r}")
    return names[0]


def _module(model: str | None, source: str | None, image_size: int, num_classes: int):
    from compress.models import default_adapt
    from compress.runs import build_module, build_spec, load

    if (model is None) == (source is None):
        raise CompressError("give exactly one of --model NAME or --from DIR")
    if source is not None:
        return load(source).eval()
    if image_size < 8 or num_classes < 1:
        raise CompressError("--image-size must be ≥ 8 and --num-classes ≥ 1")
    spec = build_spec(model, num_classes, (3, image_size, image_size), IMAGENET_MEAN, IMAGENET_STD,
                      adapt=default_adapt(model, image_size), data="none")
    return build_module(spec).eval()


def layer_table(latency: LatencyModel, name: str) -> Table:
    t = latency.table
    table = Table(title=f"latency table — {name} on {latency.describe()}", title_justify="left",
                  caption="ms: median per batch, measured with the bench runners; widths: the grid measured "
                          "(in × out; one axis for depthwise layers), interpolated bilinearly in between.")
    for col, justify in (("layer", "left"), ("op", "left"), ("input", "right"), ("in widths", "right"),
                         ("out widths", "right"), ("dense ms", "right"), ("narrowest ms", "right"),
                         ("share", "right")):
        table.add_column(col, justify=justify)
    covered = sum(layer.dense_ms() for layer in t.layers)
    for layer in t.layers:
        s = layer.shape
        op = "linear" if s.op == "linear" else f"conv{s.kernel[0]}x{s.kernel[1]}/{s.stride[0]}" + \
            (" dw" if s.depthwise else f" g{s.groups}" if s.groups > 1 else "")
        op += "".join(f"+{p}" for p in (("bn" if s.bn else None), s.act) if p)
        table.add_row(layer.layer, op, "×".join(str(d) for d in s.input_shape), _span(layer.cin), _span(layer.cout),
                      f"{layer.dense_ms():.3f}", f"{layer.ms[0][0]:.3f}", f"{layer.dense_ms() / t.dense_ms:.1%}")
    table.add_row("[bold]tables[/]", "", "", "", "", f"{covered:.3f}", "", f"{covered / t.dense_ms:.1%}")
    table.add_row("[bold]whole network (measured)[/]", "", "", "", "", f"{t.dense_ms:.3f}", "", "100%")
    return table


def _span(widths: list[int]) -> str:
    return str(widths[0]) if len(widths) == 1 else f"{widths[0]}…{widths[-1]} ({len(widths)})"


def summary_lines(latency: LatencyModel, report: BuildReport) -> list[str]:
    t = latency.table
    lines = [f"tables: {report.layers} layers, {report.signatures} distinct signatures "
             f"({report.measured} measured now, {report.points} widths; {report.signatures - report.measured} "
             f"from the cache) in {report.build_s:.1f} s",
             f"whole dense network: {t.dense_ms:.3f} ms measured{' (cached)' if report.network_cached else ''}",
             _block_line(report)]
    for st in t.stages:
        lines.append(f"stage {st['stage']} (its groups at {STAGE_FRACTION:.0%} of their width, the rest dense): "
                     f"measured saving {st['saving_ms']:.3f} ms, tables alone {st['tables_saving_ms']:.3f} ms; "
                     f"correction ×{st['factor']:.2f}")
    for c in t.checks:
        error = c["held_out_ratio"] / c["measured_ratio"] - 1
        share = f"{c['fraction']:.0%} of its width" if c["fraction"] else "its narrowest allowed width"
        lines.append(f"check, every group at {share}: measured ratio "
                     f"{c['measured_ratio']:.3f} ({c['measured_ms']:.3f} ms); predicted "
                     f"{c['held_out_ratio']:.3f} from the other checks "
                     f"(error {error:+.1%}); tables alone {c['raw_ratio']:.3f}")
    return lines


def _block_line(report: BuildReport) -> str:
    probes = "; ".join(f"{p['kernel']}x{p['kernel']} conv at {p['size']} px: "
                       + ", ".join(f"{w}→{ms:.3f}" for w, ms in zip(p["widths"], p["ms"], strict=True))
                       for p in report.block_probe.get("probes", []))
    probes = f" (probe, width→ms: {probes})" if probes else ""
    if report.channel_block == 1:
        return f"channel block: none found, widths move in --round-to steps{probes}"
    return (f"channel block: {report.channel_block} channels (a width inside a block costs the whole block), so "
            f"widths move in steps of {report.step}{probes}")


def table_json(latency: LatencyModel, name: str, report: BuildReport) -> dict[str, Any]:
    t = latency.table
    return {"model": name, "target": t.target, "dense_ms": t.dense_ms,
            "calibration": t.calibration, "checks": t.checks, "stages": t.stages,
            "build_s": round(report.build_s, 2), "measured_signatures": report.measured,
            "channel_block": report.channel_block, "step": report.step, "block_probe": report.block_probe,
            "signatures": report.signatures,
            "layers": [{"layer": layer.layer, "shape": layer.shape.to_dict(), "cin": layer.cin, "cout": layer.cout,
                        "ms": layer.ms} for layer in t.layers]}
