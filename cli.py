"""The `compress` command line: parse, call the library, print. Every command is a library call too."""

from __future__ import annotations

import functools
import sys

import click

from compress import __version__
from compress.errors import CompressError

DATA_HELP = "digits | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR | synthetic[:N]"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def handle_errors(fn):
    """Turn CompressError (and Ctrl-C) into one line on stderr and design.md's exit codes, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CompressError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="compress")
def main() -> None:
    """Prune vision models structurally (PASS, VPNs, DepGraph, L1, random), slim them physically,
    export them to ONNX/TensorRT with parity checks, and benchmark dense vs pruned latency."""


@main.command(context_settings=CONTEXT)
@click.option("--model", required=True, help="torchvision classifier or resnet20/32/44/56/110 (`compress models`).")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--out", required=True, type=click.Path(), help="Run directory to write (replaced if it is a run).")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--lr", default=0.1, show_default=True, type=float, help="Peak SGD learning rate (cosine to 0).")
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--image-size", type=int, help="Input size in px (default: the dataset's own, 224 for imagefolder).")
@click.option("--seed", default=0, show_default=True, type=int, help="Fixes init and data order.")
@click.option("--subset", type=int, help="Train on N images of the training split (seeded).")
@click.option("--weights", help="torchvision weights enum to start from (needs internet).")
@click.option("--checkpoint", type=click.Path(), help="state_dict file to start from.")
@handle_errors
def train(**kwargs) -> None:
    """Train a dense model and write a run directory (model.json, model.pt, report.json)."""
    from compress.report import print_run
    from compress.training import train_run

    out = kwargs.pop("out")
    report = train_run(kwargs.pop("model"), kwargs.pop("data"), out, **kwargs)
    print_run(out, report)


@main.command("eval", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Data spec (as for train).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@handle_errors
def eval_cmd(run_dir: str, data: str, split: str) -> None:
    """Print accuracy, FLOPs and params of a run's deployable module."""
    from compress.training import eval_run

    r = eval_run(run_dir, data, split)
    click.echo(f"accuracy {r['accuracy']:.4f} ({r['split']}, {r['n']} images)  flops {r['flops']:,}  "
               f"params {r['params']:,}")


@main.command(context_settings=CONTEXT)
def models() -> None:
    """List the model names `--model` accepts."""
    from compress.models import list_models

    click.echo("\n".join(list_models()))


if __name__ == "__main__":
    main()
