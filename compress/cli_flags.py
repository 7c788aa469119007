"""The flags several `compress` commands share, and the one error handler every command runs under.

Kept apart so that cli.py stays the list of commands; the method, token and sparse-training flags are
declared where their code is (compress/methods/, compress/tokens/, compress/sparse.py) and only turned
into click options here.
"""

from __future__ import annotations

import functools
import sys

import click

from compress.errors import CompressError


def handle_errors(fn):
    """Turn CompressError (and Ctrl-C / SIGTERM) into one line on stderr and design.md's exit codes, never a
    traceback; leave torchrun's process group (if any) at the end of the command."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compress.checkpoint import raise_on_sigterm
        from compress.runtime import current, shutdown

        raise_on_sigterm()
        try:
            return fn(*args, **kwargs)
        except CompressError as exc:
            if current().is_main:
                click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        finally:
            shutdown()

    return wrapper


def runtime_options(fn):
    """--device/--precision/--channels-last/--workers/--sync-bn: where training-like work runs (compress.runtime)."""
    options = [
        click.option("--device", default="auto", show_default=True,
                     help="auto | cpu | cuda | cuda:N (auto: CUDA when available; under torchrun each rank "
                          "uses cuda:LOCAL_RANK)."),
        click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                     help="Autocast precision of forward passes (fp16 with loss scaling, CUDA only)."),
        click.option("--channels-last", is_flag=True, help="NHWC memory format (faster convolutions on GPUs)."),
        click.option("--workers", type=int, help="Data-loader processes per rank for image folders (in-memory "
                     "datasets are indexed directly)  [default: usable cores ÷ ranks per node, at most 8]"),
        click.option("--sync-bn", is_flag=True, help="Under torchrun on GPUs: BatchNorm statistics over all ranks."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


resume_option = click.option("--resume", is_flag=True, help="Continue an interrupted run with the same settings "
                             "from its last epoch checkpoint (kept in .OUT.partial beside --out).")


def configure_runtime(kw: dict) -> None:
    """Pop the runtime flags from a command's arguments and set up this process (joining torchrun's group)."""
    from compress.progress import quiet
    from compress.runtime import configure

    rt = configure(device=kw.pop("device"), precision=kw.pop("precision"), channels_last=kw.pop("channels_last"),
                   workers=kw.pop("workers"), sync_bn=kw.pop("sync_bn"))
    quiet(not rt.is_main)


def token_flags(fn):
    """--token-keep and the other DynamicViT flags (declared in compress/tokens/training.py)."""
    from compress.tokens.training import TOKEN_FLAGS

    for flag, _field, kind, text in reversed(TOKEN_FLAGS):
        fn = click.option(flag, dest(flag), type=click.Choice(kind) if isinstance(kind, tuple) else kind,
                          help=text)(fn)
    return fn


def dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def method_flags(fn):
    """Add every registered method's own flags (declared next to the method in compress/methods/)."""
    from compress.methods import METHODS, all_options

    for _method, opt in reversed(all_options()):
        owners = ", ".join(sorted(n for n, cls in METHODS.items() if any(o.flag == opt.flag for o in cls.options)))
        kind = opt.type
        if kind is bool:
            decl, extra = f"{opt.flag}/--no-{opt.flag[2:]}", {}
        else:
            decl, extra = opt.flag, {"type": click.Choice(kind) if isinstance(kind, tuple) else kind}
        fn = click.option(decl, opt.dest, default=opt.default, show_default=True, help=f"[{owners}] {opt.help}",
                          **extra)(fn)
    return fn


def sparse_flags(fn):
    """The sparse-training stage's flags (declared in compress/sparse.py, where the stage is)."""
    from compress.sparse import SPARSE_OPTIONS

    for opt in reversed(SPARSE_OPTIONS):
        fn = click.option(opt.flag, opt.dest, type=opt.type, default=opt.default, show_default=opt.default is not None,
                          help=opt.help[0].upper() + opt.help[1:] + ".")(fn)
    return fn
