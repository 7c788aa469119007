"""The `compress` command line: parse, call the library, print. Every command is a library call too."""

from __future__ import annotations

import warnings

import click

from compress import __version__
from compress.cli_flags import (
    configure_runtime,
    dest,
    handle_errors,
    method_flags,
    resume_option,
    runtime_options,
    sparse_flags,
    token_flags,
)
from compress.errors import CompressError
from compress.token_study import command as token_study

# fvcore (FLOPs counting) still calls torch.jit.script, which warns on every import.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
# Warnings reach a command-line user as one line (a deprecated flag: what to write instead), not source lines.
warnings.formatwarning = lambda message, category, *_args, **_kw: f"{category.__name__}: {message}\n"

DATA_HELP = "digits | fashion-mnist[:DIR] | cifar10:DIR | cifar100:DIR | imagefolder:DIR | synthetic[:N]"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random crops and flips where the dataset allows them.")
@resume_option
@runtime_options
@handle_errors
def train(**kwargs) -> None:
    """Train a dense model and write a run directory (model.json, model.pt, report.json).

    Runs on one device, or on several under `torchrun --nproc_per_node N -m compress train ...` (DDP;
    --batch-size is the global batch, split across ranks). Every epoch is checkpointed; Ctrl-C or SIGTERM
    leaves nothing at --out and prints the command that resumes."""
    from compress.report import print_run
    from compress.runtime import current
    from compress.training import train_run

    configure_runtime(kwargs)
    out = kwargs.pop("out")
    report = train_run(kwargs.pop("model"), kwargs.pop("data"), out, **kwargs)
    if current().is_main:
        print_run(out, report)


@main.command("eval", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--data", required=True, help="Data spec (as for train).")
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@runtime_options
@handle_errors
def eval_cmd(run_dir: str, data: str, split: str, **kw) -> None:
    """Print accuracy, FLOPs and params of a run's deployable module."""
    from compress.runtime import current
    from compress.training import eval_run

    configure_runtime(kw)
    r = eval_run(run_dir, data, split)
    if current().is_main:
            click.echo(f"accuracy {r['accuracy']:.4f} ({r['split']}, {r['n']} images)  flops {r['flops']:,}  "
                   f"params {r['params']:,}")


@main.command(context_settings=CONTEXT)
@click.option("--from", "source", type=click.Path(), help="A trained run directory to prune (compress train).")
@click.option("--model", help="Or a model name to prune (with --checkpoint/--weights for its starting weights).")
@click.option("--checkpoint", type=click.Path(), help="state_dict file for --model.")
@click.option("--weights", help="torchvision weights enum for --model (needs internet).")
@click.option("--image-size", type=int, help="Input size for --model (default: the dataset's own).")
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--method", required=True, help="l1 | depgraph | dessilbi | random | vpns | pass | dynamicvit (every "
              "registered method).")
@click.option("--flops-ratio", type=float, help="Pruned FLOPs ÷ dense FLOPs to reach, in (0, 1] (the whole module's, "
              "tokens included); not with --method dynamicvit, whose FLOPs follow from --token-keep.")
@click.option("--latency-ratio", type=float, help="Or: pruned ÷ dense latency measured on the target "
              "(--latency-backend/-threads/-batch-size), in (0, 1]. Exclusive with --flops-ratio.")
@click.option("--latency-backend", help="Where --latency-ratio is measured: onnxruntime (ort), torch, torch-cuda, "
              "tensorrt  [default: onnxruntime]")
@click.option("--latency-threads", type=int, help="CPU threads of the latency target  [default: physical cores]")
@click.option("--latency-batch-size", type=int, help="Batch size of the latency target  [default: 1]")
@click.option("--latency-clock", type=click.Choice(["wall", "cpu"]), help="How CPU latency is timed (cpu: the "
              "calling thread's CPU time, one thread only; immune to other processes)  [default: wall]")
@click.option("--latency-precision", type=click.Choice(["fp32", "fp16", "bf16"]), help="Precision the target runs "
              "the network at (fp16/bf16: torch-cuda only)  [default: fp32]")
@click.option("--latency-cache", type=click.Path(), help="Latency table cache  [default: as compress latency-table]")
@click.option("--allocation", type=click.Choice(["rank", "knapsack"]), help="How widths are allocated: rank (remove "
              "the globally least important units) or knapsack (the most important compute within the budget)  "
              "[default: rank for --flops-ratio, knapsack for --latency-ratio]")
@click.option("--out", required=True, type=click.Path(), help="Run directory to write (replaced if it is a run).")
@click.option("--scope", type=click.Choice(["global", "local"]), default="global", show_default=True,
              help="Rank units across groups (global) or keep one ratio per group (local).")
@click.option("--round-to", default=8, show_default=True, type=int, help="Pruned widths are multiples of K.")
@click.option("--finetune-epochs", default=5, show_default=True, type=int, help="Fine-tuning after slimming.")
@click.option("--lr", default=0.05, show_default=True, type=float, help="Peak SGD learning rate (cosine to 0).")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--weight-decay", default=5e-4, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--subset", type=int, help="Train (search, fine-tune) on N images of the training split.")
@click.option("--bn-recalibration/--no-bn-recalibration", default=True, show_default=True,
              help="Re-estimate BatchNorm statistics on training images after slimming, before fine-tuning.")
@sparse_flags
@resume_option
@runtime_options
@token_flags
@method_flags
@click.pass_context
@handle_errors
def prune(ctx: click.Context, **kw) -> None:
    """Prune channels structurally to a FLOPs ratio or a measured latency ratio, slim, fine-tune, and write a
    run directory.

    --latency-ratio measures per-layer latency tables on the target once (cached; see
    `compress latency-table`), allocates widths by importance under that budget, and confirms the slimmed
    model by timing it against the dense one on the target.

    Every training-like step (the method's search, fine-tuning) runs on --device, or under torchrun on
    several (DDP; masks are checked identical on every rank). Checkpointed per epoch: Ctrl-C or SIGTERM
    leaves nothing at --out and prints the command that resumes."""
    from click.core import ParameterSource

    from compress.methods import all_options, get_method
    from compress.pipeline import prune_run
    from compress.pruning.summary import print_prune
    from compress.runtime import current
    from compress.tokens.training import TOKEN_FLAGS, token_options

    configure_runtime(kw)

    method = get_method(kw["method"])
    tokens = token_options({field: kw.pop(dest(flag)) for flag, field, _kind, _help in TOKEN_FLAGS},
                           implied=not method.prunes_channels)
    declared = {o.dest for o in method.options}
    options = {}
    for _owner, opt in all_options():
        value = kw.pop(opt.dest)
        if opt.dest in declared:
            options[opt.dest] = value
        elif ctx.get_parameter_source(opt.dest) != ParameterSource.DEFAULT:
            raise CompressError(f"{opt.flag} does not apply to method {kw['method']}")
    out = kw.pop("out")
    report = prune_run(out, method=kw.pop("method"), data=kw.pop("data"), method_options=options, tokens=tokens,
                       **kw)
    if current().is_main:
        print_prune(out, report)


@main.command(context_settings=CONTEXT)
def models() -> None:
    """List the model names `--model` accepts."""
    from compress.models import list_models

    click.echo("\n".join(list_models()))


@main.command(context_settings=CONTEXT)
@click.argument("targets", nargs=-1, required=True, type=click.Path())
@click.option("--backend", help="Comma list: torch, torch-cuda, torch-compile, torch-compile-cuda, onnxruntime (ort), "
              "ort-cuda, ort-trt, tensorrt. Default: every backend present that runs the targets "
              "(torch.compile only when named).")
@click.option("--batch-size", help="Comma list of batch sizes, e.g. 1,32  [default: 1, or the --baseline file's]")
@click.option("--threads", type=int, help="CPU threads for torch and ONNX Runtime  [default: physical cores]")
@click.option("--json", "json_path", type=click.Path(), help="Write samples and statistics here (design.md).")
@click.option("--plot", type=click.Path(), help="Write a PNG of latency vs FLOPs.")
@click.option("--baseline", type=click.Path(), help="A saved --json file to gate TARGET against.")
@click.option("--max-regression", type=float, help="Gate: exit 1 if a target is more than this fraction slower "
              "than its baseline (e.g. 0.10) and the slowdown is significant.")
@click.option("--min-speedup", type=float, help="Gate: exit 1 if a target is significantly less than this many "
              "times faster than the first target (e.g. 1.2).")
@click.option("--alpha", default=0.01, show_default=True, type=float, help="Significance level of the gate's "
              "Mann-Whitney U test.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), help="How CPU runs are timed: wall clock, or the "
              "calling thread's CPU time (needs --threads 1; immune to preemption on shared machines)  [default: wall]")
@click.option("--warmup", default=0.2, show_default=True, type=float, help="Warm-up seconds per target (>= 5 runs).")
@click.option("--duration", default=2.0, show_default=True, type=float,
              help="Minimum measured seconds per target, backend and batch size.")
@click.option("--min-iters", default=10, show_default=True, type=int, help="Minimum measured runs per target.")
@click.option("--sessions", default=3, show_default=True, type=int, help="ONNX Runtime CPU: load each target this "
              "many times and pool the samples (--duration is split between them). One session's latency moves by a "
              "few percent with where its buffers land; pooling keeps that out of the ratios.")
@click.option("--tf32/--no-tf32", default=False, show_default=True, help="Let fp32 convolutions and matmuls round "
              "to TF32 on the CUDA backends (torch-cuda, ort-cuda, tensorrt builds). Off: fp32 means fp32 everywhere; "
              "ort-trt cannot turn it off. Each result records it.")
@handle_errors
def bench(targets: tuple[str, ...], **kwargs) -> None:
    """Measure latency of run directories, .onnx files or TensorRT engines side by side (interleaved).

    The first TARGET is the baseline: every other target gets a speedup with a bootstrap 95% interval
    and a speedup fidelity (speedup ÷ FLOPs reduction). With --max-regression/--min-speedup it is a
    latency gate (exit 1 on a significant regression beyond the limit).
    """
    from bench.command import bench_command

    bench_command(targets, **kwargs)


@main.command("export", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), default="onnx", show_default=True)
@click.option("--out", required=True, type=click.Path(), help="File to write (.onnx or .engine); appears only "
              "once its parity check passed.")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset, pinned.")
@click.option("--batch-size", type=int, help="Fixed batch size of the file  [default: 1]")
@click.option("--dynamic-batch", is_flag=True, help="Symbolic batch dimension (TensorRT: a min/opt/max profile).")
@click.option("--fp16", is_flag=True, help="TensorRT: fp16 engine (I/O stays fp32).")
@click.option("--workspace", type=float, help="TensorRT: workspace memory pool in GB  [default: 4]")
@click.option("--timing-cache", type=click.Path(), help="TensorRT: timing cache file to read and update.")
@click.option("--min-batch", type=int, help="TensorRT: profile minimum batch  [default: 1]")
@click.option("--opt-batch", type=int, help="TensorRT: profile batch to tune for  [default: max]")
@click.option("--max-batch", type=int, help="TensorRT: profile maximum batch  [default: 32]")
@click.option("--data", help="Also check parity on validation images of this data spec: " + DATA_HELP)
@click.option("--no-check", is_flag=True, help="Skip the parity check (said in the output).")
@click.option("--no-simplify", is_flag=True, help="Keep the exporter's graph (no onnxslim pass).")
@click.option("--json", "json_path", type=click.Path(), help="Write the table's figures here as JSON.")
@handle_errors
def export_cmd(run_dir: str, **kwargs) -> None:
    """Export a run's deployable module to ONNX or a TensorRT engine, checking numerical parity.

    The file is run in ONNX Runtime (or TensorRT) on seeded inputs, plus --data validation images, and
    compared with PyTorch: above tolerance (fp32: 1e-4 of the output scale) it exits 1 and keeps the
    file as OUT.failed, with nothing at OUT.
    """
    from export.command import export_command

    export_command(run_dir, **kwargs)


@main.command(context_settings=CONTEXT)
@click.option("--preset", type=click.Choice(["scratch", "pretrained"]), default="scratch", show_default=True,
              help="The study to run: scratch (ResNet-20 trained on Fashion-MNIST, docs/results.md) or pretrained "
              "(ImageNet EfficientNet-Lite0 fine-tuned on Fashion-MNIST at 64 px, docs/results-pretrained.md, needs "
              "the `pretrained` extra). The options below override its settings.")
@click.option("--methods", help="Comma list of method specs name[:option=value...]; unregistered methods are "
              "reported as missing.")
@click.option("--ratios", help="FLOPs ratios (pruned ÷ dense).")
@click.option("--seeds", help="Seeds per method and ratio.")
@click.option("--data", help=DATA_HELP)
@click.option("--model")
@click.option("--weights", help="Pretrained weights the dense parent starts from (e.g. imagenet).")
@click.option("--image-size", type=int, help="Input size in px.")
@click.option("--subset", type=int, help="Training images (full val split).")
@click.option("--dense-epochs", type=int, help="Epochs of the one dense parent.")
@click.option("--dense-lr", type=float, help="Peak SGD learning rate of the dense parent.")
@click.option("--finetune-epochs", type=int, help="Fine-tuning epochs, every method.")
@click.option("--finetune-lr", type=float)
@click.option("--round-to", type=int)
@click.option("--scope", type=click.Choice(["global", "local"]))
@click.option("--work", type=click.Path(),
              help="Where the dense parent and pruned runs go (runs with the same settings are reused).")
@click.option("--docs", type=click.Path(), help="Where <name>.md, .json and .png are written.")
@click.option("--name", help="File name of the results (results, results-pretrained, …).")
@click.option("--no-latency", is_flag=True, help="Skip the ONNX Runtime latency measurement.")
@click.option("--only-done", is_flag=True, help="Train nothing: write the results from the runs already made and "
              "list the cells that are not (e.g. after several `compress study --methods …` processes shared --work).")
@click.option("--fresh", is_flag=True, help="Redo every run even if one with the same settings exists.")
@click.option("--jobs", type=int, help="Worker processes that make the cells side by side, the torch threads "
              "split between them (on a CPU, N one-thread processes beat one N-thread process on these small "
              "models)  [default: 1]")
@runtime_options
@handle_errors
def study(**kw) -> None:
    """Compare pruning methods: one dense parent, each method × ratio × seed pruned with the same
    fine-tuning budget; accuracy, FLOPs, params, ONNX Runtime latency; a results page + plot.

    An interrupted study continues where it stopped when run again (finished runs are reused, the
    interrupted one resumes from its checkpoint)."""
    from compress.runtime import current
    from compress.study import parse_list, preset, run_study

    configure_runtime(kw)

    def listed(key: str, kind=float):
        return parse_list(kw[key], kind) if kw[key] is not None else None

    config = preset(kw["preset"], data=kw["data"], model=kw["model"], weights=kw["weights"],
                    image_size=kw["image_size"], subset=kw["subset"], dense_epochs=kw["dense_epochs"],
                    dense_lr=kw["dense_lr"], finetune_epochs=kw["finetune_epochs"], finetune_lr=kw["finetune_lr"],
                    ratios=listed("ratios"), seeds=listed("seeds", int),
                    methods=tuple(m for m in kw["methods"].split(",") if m.strip()) if kw["methods"] else None,
                    scope=kw["scope"], round_to=kw["round_to"], work=kw["work"], docs=kw["docs"], name=kw["name"],
                    latency=False if kw["no_latency"] else None, fresh=kw["fresh"] or None,
                    only_done=kw["only_done"] or None, jobs=kw["jobs"])
    results = run_study(config)
    if current().is_main:
        click.echo(f"wrote {config.docs}/{config.name}.md, .json and .png "
                   f"({results['runs_done']} runs done, {results['runs_reused']} reused, "
                   f"{results['study_wall_s']:.0f} s)")


@main.command("latency-table", context_settings=CONTEXT)
@click.option("--model", help="Model name to tabulate (random weights: latency does not depend on them).")
@click.option("--from", "source", type=click.Path(), help="Or a run directory (its model as trained or pruned).")
@click.option("--image-size", default=224, show_default=True, type=int, help="Input size for --model.")
@click.option("--num-classes", default=1000, show_default=True, type=int, help="Classifier width for --model.")
@click.option("--backend", default="onnxruntime", show_default=True,
              help="Where to measure: onnxruntime (ort), torch, torch-cuda, tensorrt, ort-cuda.")
@click.option("--threads", type=int, help="CPU threads  [default: physical cores]")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="fp16/bf16: torch-cuda only.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="CPU backends: wall clock, or the calling thread's CPU time (one thread; immune to other "
              "processes on a shared machine).")
@click.option("--round-to", default=8, show_default=True, type=int, help="Widths measured are multiples of K.")
@click.option("--points", default=6, show_default=True, type=int,
              help="Widths measured per axis of each layer (all multiples of --round-to when there are fewer).")
@click.option("--cache-dir", type=click.Path(), help="Table cache  [default: $COMPRESS_CACHE_DIR/latency or "
              "~/.cache/compress/latency]")
@click.option("--json", "json_path", type=click.Path(), help="Also write the tables here as JSON.")
@handle_errors
def latency_table(**kw) -> None:
    """Measure (or reuse from the cache) a model's per-layer latency lookup tables on a backend, and
    check their whole-network prediction against the measured whole network.

    Each convolution/Linear layer that pruning can narrow is timed, with the BatchNorm and activation
    after it, over a grid of input × output widths with the bench runners (median of interleaved
    runs). Tables are cached per backend, library versions, host, layer signature, batch size and
    threads, and reused by `compress prune --latency-ratio`.
    """
    from bench.lut_command import latency_table_command

    latency_table_command(**kw)


@main.command("latency-study", context_settings=CONTEXT)
@click.option("--parts", default="budget,capacity", show_default=True,
              help="Which experiments: budget, capacity, accuracy (needs --parent).")
@click.option("--budget-models", default=",".join(("resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf",
                                                   "convnext_tiny")), show_default=True)
@click.option("--ratios", default="0.5,0.3", show_default=True, help="--latency-ratio targets of the budget part.")
@click.option("--capacity-models", default=",".join(("resnet50", "mobilenet_v2", "efficientnet_b0", "regnet_x_400mf",
                                                     "convnext_tiny", "resnet18", "densenet121",
                                                     "mobilenet_v3_small")), show_default=True)
@click.option("--flops-ratio", default=0.26, show_default=True, type=float,
              help="The FLOPs-targeted networks of the capacity part.")
@click.option("--threads", default="2,1", show_default=True,
              help="ONNX Runtime threads: the first for the budget part and the headline capacity figures.")
@click.option("--clock", type=click.Choice(["wall", "cpu"]), default="wall", show_default=True,
              help="How every prune and bench times CPU latency (cpu: the calling thread's CPU time, --threads 1 "
              "only; immune to other processes on a shared machine).")
@click.option("--image-size", default=224, show_default=True, type=int)
@click.option("--bench-duration", default=3.0, show_default=True, type=float,
              help="Seconds measured per model in each `compress bench`.")
@click.option("--work", default="runs/latency", show_default=True, type=click.Path())
@click.option("--docs", default="docs", show_default=True, type=click.Path(),
              help="Where latency.md (generated blocks) and latency.json are written.")
@click.option("--cache-dir", type=click.Path(), help="Latency table cache  [default: as compress latency-table]")
@click.option("--fresh", is_flag=True, help="Redo every run even if one with the same settings exists.")
@click.option("--parent", type=click.Path(), help="accuracy: the trained run pruned both ways (e.g. the dense run "
              "of `compress study`, runs/study/dense).")
@click.option("--data", default="fashion-mnist", show_default=True, help="accuracy: the parent's dataset.")
@click.option("--accuracy-methods", default="l1,pass", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True, help="accuracy: one pair of prunes per method and seed.")
@click.option("--accuracy-flops-ratio", default=0.5, show_default=True, type=float,
              help="accuracy: the FLOPs target whose measured latency the latency-targeted prune aims at.")
@click.option("--subset", default=3000, show_default=True, type=int,
              help="accuracy: training images for the search and fine-tuning (validation: the full split).")
@click.option("--finetune-epochs", default=2, show_default=True, type=int,
              help="accuracy: fine-tuning epochs, the same for both prunes.")
@handle_errors
def latency_study(**kw) -> None:
    """Run the latency-budget acceptance experiments and write docs/latency.md and docs/latency.json.

    budget: prune each model with --latency-ratio R and measure the result with `compress bench`.
    capacity: at the latency a --flops-ratio prune reaches, compare it with a --latency-ratio prune
    (FLOPs kept, speedup fidelity). accuracy: prune a trained --parent both ways to the same measured
    latency, fine-tune alike, compare accuracy. Wall-clock figures need a quiet machine; on a shared one
    use --threads 1 --clock cpu.
    """
    from compress.latency_accuracy import AccuracySettings
    from compress.latency_study import LatencyStudyConfig, run_latency_study
    from compress.study import parse_list

    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    config = LatencyStudyConfig(parts=names(kw["parts"]), budget_models=names(kw["budget_models"]),
                                ratios=parse_list(kw["ratios"]), capacity_models=names(kw["capacity_models"]),
                                flops_ratio=kw["flops_ratio"], threads=parse_list(kw["threads"], int),
                                clock=kw["clock"], image_size=kw["image_size"], bench_duration=kw["bench_duration"],
                                work=kw["work"], docs=kw["docs"], cache_dir=kw["cache_dir"], fresh=kw["fresh"],
                                accuracy=AccuracySettings(parent=kw["parent"], data=kw["data"],
                                                          methods=names(kw["accuracy_methods"]),
                                                          seeds=parse_list(kw["seeds"], int),
                                                          flops_ratio=kw["accuracy_flops_ratio"],
                                                          subset=kw["subset"], finetune_epochs=kw["finetune_epochs"]))
    results = run_latency_study(config)
    click.echo(f"wrote {config.docs}/latency.md and latency.json ({results['wall_s']:.0f} s)")


main.add_command(token_study)

if __name__ == "__main__":
    main()
