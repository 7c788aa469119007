"""`python -m compress.zoo`: sweep models through prune → reload → export and write docs/zoo.md."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from compress.errors import CompressError
from compress.files import write_atomic
from compress.zoo import COMMON_224, MAX_PX, MIN_PX, TIMM_FAMILIES, Entry, SweepConfig, doc, sweep
from compress.zoo.proc import run_measured

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT)
@click.option("--family", "families", default="torchvision,timm", show_default=True,
              help="Comma list: torchvision (every classifier), timm (one model per family).")
@click.option("--models", help="Comma list of model names instead of whole families (e.g. resnet18,timm:vit_tiny_"
              "patch16_224).")
@click.option("--methods", default="l1,depgraph", show_default=True, help="Comma list of pruning methods.")
@click.option("--sizes", default="min,224", show_default=True,
              help="min: the smallest input size each model takes from 64 px up; 224: also the common models "
              "(and every --models name) at 224 px.")
@click.option("--data", default="synthetic:200", show_default=True, help="Data spec for prune and eval.")
@click.option("--flops-ratio", default=0.5, show_default=True, type=float)
@click.option("--finetune-epochs", default=1, show_default=True, type=int)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--results", default="docs/zoo.json", show_default=True, type=click.Path(),
              help="Records, written after every entry; entries already there are skipped (resume).")
@click.option("--docs", default="docs/zoo.md", show_default=True, type=click.Path(), help="Markdown report.")
@click.option("--work", default="runs/zoo", show_default=True, type=click.Path(),
              help="Scratch directory for run directories and ONNX files.")
@click.option("--max-rss-gb", default=16.0, show_default=True, type=float,
              help="Kill a step whose resident memory passes this (the engine's own guard should refuse first).")
@click.option("--timeout", default=3600.0, show_default=True, type=float, help="Kill a step after this many s.")
@click.option("--fresh", is_flag=True, help="Ignore the records already in --results.")
@click.option("--keep", is_flag=True, help="Keep run directories and ONNX files under --work.")
@click.option("--docs-only", is_flag=True, help="Only rewrite --docs from --results.")
def main(**kw) -> None:
    """Prune every model with each method, reload it in a new process, export it to ONNX with parity, and
    record what worked, what was refused (and why), prune time and peak memory in --results and --docs."""
    try:
        run(**kw)
    except CompressError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("error: interrupted (records so far are in --results; run again to resume)", err=True)
        sys.exit(130)


def run(*, families: str, models: str | None, methods: str, sizes: str, data: str, flops_ratio: float,
        finetune_epochs: int, batch_size: int, results: str, docs: str, work: str, max_rss_gb: float,
        timeout: float, fresh: bool, keep: bool, docs_only: bool) -> None:
    results_path, docs_path = Path(results), Path(docs)
    command = "python -m compress.zoo " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if docs_only:
        if not results_path.is_file():
            raise CompressError(f"--docs-only needs the records at {results_path}")
        doc.write(docs_path, json.loads(results_path.read_text()))
        return
    cfg = SweepConfig(data=data, flops_ratio=flops_ratio, finetune_epochs=finetune_epochs, batch_size=batch_size,
                      max_rss_gb=max_rss_gb, timeout_s=timeout, keep=keep)
    names = _names(families, models)
    size_modes = [s.strip() for s in sizes.split(",") if s.strip()]
    if not names or not size_modes or any(s not in ("min", "224") for s in size_modes):
        raise CompressError("--sizes takes min and/or 224, and there must be models to sweep")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    known = _read(results_path) if not fresh else {}
    smallest = dict(known.get("sizes", {}))
    if "min" in size_modes:
        _probe_sizes([n for n in names if n not in smallest], smallest, cfg, results_path)
    entries = []
    for name in names:
        sizes_of = []
        if "min" in size_modes:
            sizes_of.append(smallest[name] or MAX_PX)    # none: the prune step says why it does not run
        if "224" in size_modes and (models or name in COMMON_224) and 224 not in sizes_of:
            sizes_of.append(224)
        entries += [Entry(name, size, method) for size in sizes_of for method in method_list]

    def report(record, i, n):
        click.echo(f"[{i}/{n}] {record['key']}: {record['status']}"
                   + (f" ({record['stage']}: {record['reason']})" if record["reason"] else "")
                   + f"  {record['wall_s']:.0f} s", err=True)

    out = sweep(entries, cfg, results_path, Path(work), fresh=fresh, command=command, on_record=report)
    out["sizes"] = smallest
    write_atomic(results_path, (json.dumps(out, indent=1) + "\n").encode())
    doc.write(docs_path, out)
    for family, figures in doc.summary(out["records"]).items():
        click.echo(f"{family}: {figures}")


def _names(families: str, models: str | None) -> list[str]:
    if models:
        return [m.strip() for m in models.split(",") if m.strip()]
    names = []
    for family in (f.strip() for f in families.split(",") if f.strip()):
        if family == "torchvision":
            from torchvision import models as tvm

            names += list(tvm.list_models(module=tvm))
        elif family == "timm":
            names += ["timm:" + n for n in TIMM_FAMILIES.values()]
        else:
            raise CompressError(f"--family takes torchvision and/or timm, got {family!r}")
    return names


def _probe_sizes(names: list[str], smallest: dict[str, int | None], cfg: SweepConfig, results_path: Path) -> None:
    """Fill `smallest` with the smallest input size of each of `names`, saving as it goes. All are probed in
    one child process (building some models takes gigabytes; one process starts torch once, not per model);
    the models that child did not finish (killed by the cap, crashed) are probed again one per process."""
    if not names:
        return
    found = _probe(names, cfg)
    for name in names:
        smallest[name] = found[name] if name in found else _probe([name], cfg).get(name)
        click.echo(f"{name}: smallest input {smallest[name]} px", err=True)
    _save_sizes(results_path, smallest)


def _probe(names: list[str], cfg: SweepConfig) -> dict[str, int | None]:
    """`{name: smallest size or None}` for the models a child process finished probing."""
    code = ("import sys\nfrom compress.zoo import smallest_size\nfor name in sys.argv[1:]:\n"
            f"    print('probed', name, smallest_size(name, {MIN_PX}, {MAX_PX}), flush=True)")
    outcome = run_measured([sys.executable, "-c", code, *names], max_rss_gb=cfg.max_rss_gb, timeout_s=cfg.timeout_s)
    found: dict[str, int | None] = {}
    for line in outcome.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "probed" and parts[1] in names:
            found[parts[1]] = int(parts[2]) if parts[2].isdigit() else None
    return found


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_sizes(path: Path, sizes: dict) -> None:
    current = _read(path)
    current["sizes"] = sizes
    write_atomic(path, (json.dumps(current, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
