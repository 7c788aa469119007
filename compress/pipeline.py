"""`compress prune` as a library call: the pipeline every pruning method shares.

dense accuracy/FLOPs → channel groups → the target's cost model (FLOPs, or latency tables measured on
the target backend: compress/budget.py) → method search → masks hitting the target (confirmed with
real fvcore, or by timing the slimmed deployable module against the dense one on the target:
compress/calibration.py) → slim → (latency target: the slim model measured on the target) → BN
statistics re-estimated → accuracy before fine-tuning → fine-tune (weights and prompt) → run directory
with model.json "layers"/"widths", weights-only model.pt and report.json (design.md keys, per-stage
wall times).

With token sparsification (`tokens`, compress/tokens; docs/tokens.md) a ViT also gets DynamicViT
prediction modules, trained by the DynamicViT stage against the dense parent — after the channel
pruning and fine-tuning (order "after"), or before the channel search (order "before", the search then
sees the token-sparse network). The FLOPs target is then the whole module's, at its real token counts.
`--method dynamicvit` prunes tokens only (no channel target).

Every training-like step runs through the shared loop (compress/loop.py) on the configured runtime
(device, precision, torchrun ranks); the search result and every epoch are checkpointed beside --out,
so `resume=True` continues an interrupted run and ends with the same weights and report.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from compress.budget import Budget, Meter
from compress.calibration import choose_masks
from compress.checkpoint import Checkpoint, get_rng, interruptible, set_rng
from compress.data import DataBundle, load_data
from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.flops import count_flops, count_params
from compress.loop import BN_IMAGES, Fit, evaluate, reestimate_bn, run_stage
from compress.methods.base import PruneContext, SearchResult, get_method
from compress.pruning.groups import ChannelGroup, find_groups
from compress.pruning.slim import slim
from compress.pruning.structure import layer_spec, module_copy, widths
from compress.pruning.target import ALLOCATIONS, SCOPES, mask_overlap, smallest_ratio, step_note
from compress.runs import Stopwatch, build_module, is_run, load, read_spec
from compress.runtime import current
from compress.sparse import SparseConfig, sparse_train
from compress.tokens import backbone_of, token_spec
from compress.tokens.training import TokenOptions, frozen_predictors, train_tokens
from compress.tokens.training import check_model as check_token_model

RATIO_TOLERANCE = 0.02
BN_RECALIBRATION_IMAGES = BN_IMAGES


def prune_run(out: str | Path, *, data: str, method: str, flops_ratio: float | None = None,
              latency_ratio: float | None = None, latency_backend: str | None = None,
              latency_threads: int | None = None, latency_batch_size: int | None = None,
              latency_clock: str | None = None, latency_precision: str | None = None,
              latency_cache: str | None = None, allocation: str | None = None,
              source: str | Path | None = None, model: str | None = None, checkpoint: str | None = None,
              weights: str | None = None, image_size: int | None = None, scope: str = "global", round_to: int = 8,
              finetune_epochs: int = 5, seed: int = 0, lr: float = 0.05, batch_size: int = 128,
              weight_decay: float = 5e-4, subset: int | None = None, method_options: dict[str, Any] | None = None,
              bn_recalibration: bool = True, resume: bool | str = False,
              tokens: TokenOptions | None = None, sparse_train_epochs: int = 0, sparse_reg: str | None = None,
              sparse_lambda: float | None = None, sparse_alpha: float = 4.0) -> dict[str, Any]:
    """Prune a trained run (`source`) or a model (`model` [+ checkpoint/weights]) to `flops_ratio`, or to
    `latency_ratio` measured on `latency_backend` (threads, batch size, clock, precision), and write run `out`.
    `allocation` is "rank" or "knapsack" (default: rank for a FLOPs target, knapsack for latency).

    Neither ratio (only with token sparsification): no channel is pruned. `sparse_*`: sparse training
    before the method ranks (compress/sparse.py).

    Returns report.json's content. Bad input raises CompressError before any output is written; an
    interruption raises `compress.checkpoint.Interrupted` with progress kept for `resume=True`.
    """
    method_cls = get_method(method)
    tokens = _check_tokens(method_cls, flops_ratio, latency_ratio, tokens)
    budget = None
    if method_cls.prunes_channels:
        budget = Budget.from_flags(flops_ratio, latency_ratio, backend=latency_backend, threads=latency_threads,
                                   batch_size=latency_batch_size, clock=latency_clock, precision=latency_precision,
                                   cache_dir=latency_cache)
    allocation = allocation or (budget.allocation if budget else "rank")
    _check_inputs(out, source, model, budget, scope, round_to, finetune_epochs, lr, batch_size, allocation)
    options = dict(method_options or {})
    sparse = SparseConfig.from_flags(**{**dict(reg=sparse_reg, epochs=sparse_train_epochs, lam=sparse_lambda,
                                                alpha=sparse_alpha), **_legacy_sparse_options(options)})
    if sparse.epochs and not method_cls.prunes_channels:
        raise CompressError(f"--sparse-train-epochs precedes a channel ranking; --method {method} prunes tokens only")
    method_obj = method_cls(**options)
    settings = {"command": "prune", "data": data, "method": method,
                "budget": asdict(budget) if budget else None, "allocation": allocation,
                "source": str(source) if source is not None else None, "model": model, "checkpoint": checkpoint,
                "weights": weights, "image_size": image_size, "scope": scope, "round_to": round_to,
                "finetune_epochs": finetune_epochs, "seed": seed, "lr": lr, "batch_size": batch_size,
                "weight_decay": weight_decay, "subset": subset, "method_options": method_obj.config,
                "bn_recalibration": bn_recalibration, "precision": current().precision,
                "world_size": current().world_size, "tokens": asdict(tokens) if tokens else None,
                "sparse": sparse.describe()}
    progress = Checkpoint(out, settings, resume=resume)
    with interruptible(progress):
        report = _prune(out, progress, method_obj, settings)
    progress.discard()
    return report


def _prune(out, progress: Checkpoint, method_obj, s: dict[str, Any]) -> dict[str, Any]:
    from compress.training import seed_everything

    rt = current()
    watch = Stopwatch()
    seed_everything(s["seed"])
    start = time.perf_counter()
    module, spec, bundle = _load_source(s["source"], s["model"], s["checkpoint"], s["weights"], s["data"],
                                        s["image_size"], s["subset"], s["seed"])
    rt.place(module)
    reference = _dense_reference(module, spec)
    tokens = TokenOptions(**s["tokens"]) if s["tokens"] else None
    if tokens:
        check_token_model(module.net, tokens)
    input_size = tuple(module.input_size)
    dense = {"flops": count_flops(module, input_size), "params": count_params(module),
             "accuracy": evaluate(module, bundle.val)}
    watch.lap("dense", start)
    teacher = copy.deepcopy(module).eval() if tokens else None      # the dense parent, for distillation
    token_records = {}
    if tokens and tokens.order == "before":
        start = time.perf_counter()
        token_records["dynamicvit"] = train_tokens(module, teacher, bundle, tokens, s["seed"], s["batch_size"],
                                                   progress, s["lr"], s["weight_decay"])
        watch.lap("tokens", start)
    budget = Budget(**s["budget"]) if s["budget"] else None
    if budget is None:                   # tokens only: no channel is pruned
        groups, masks, estimate, digests, result, ctx = [], {}, 1.0, [], SearchResult(), None
        accuracy_slimmed = accuracy_before = dense["accuracy"]
        history, target, sparse_report = [], {}, None
    else:
        (groups, masks, estimate, digests, result, ctx, accuracy_slimmed, accuracy_before, history, target,
         sparse_report) = _prune_channels(module, bundle, method_obj, s, spec, progress, watch, dense, tokens,
                                          budget)
    if tokens and tokens.order == "after":
        start = time.perf_counter()
        token_records["dynamicvit"] = train_tokens(module, teacher, bundle, tokens, s["seed"], s["batch_size"],
                                                   progress, s["lr"], s["weight_decay"])
        watch.lap("tokens", start)
    flops = count_flops(module, input_size)
    achieved = flops / dense["flops"]
    accuracy = evaluate(module, bundle.val)

    new_spec = _pruned_spec(module, spec, reference, bundle, result, tokens)
    flops_target = budget.ratio if budget is not None and budget.kind == "flops" else None
    report = {
        "command": "prune", "model": spec["model"], "data": bundle.spec, "seed": s["seed"],
        "input_size": list(input_size), "accuracy": accuracy, "flops": flops, "params": count_params(module),
        "method": s["method"], "flops_ratio_target": flops_target, "flops_ratio": round(achieved, 6),
        "dense": dense, "accuracy_before_finetune": accuracy_before, "widths": new_spec["widths"],
        "accuracy_slimmed": accuracy_slimmed, "bn_recalibration": s["bn_recalibration"],
        **({} if budget is not None and budget.kind == "latency" else {
            "flops_ratio_estimate": round(estimate, 6),
            "flops_ratio_note": _ratio_note(achieved, flops_target, s["round_to"])}),
        "target": budget.kind if budget else None, "allocation": s["allocation"], **target,
        "scope": s["scope"], "round_to": s["round_to"], "finetune_epochs": s["finetune_epochs"], "lr": s["lr"],
        "batch_size": s["batch_size"], "weight_decay": s["weight_decay"], "subset": s["subset"],
        "source": s["source"], "method_options": method_obj.config, **rt.describe(),
        "mask_digests": digests, "resumed": progress.resumed,
        "groups": len(groups), "groups_pruned": sum(1 for g in groups if not bool(masks[g.id].all())),
        "groups_excluded": [{"root": r, "reason": why} for r, why in (groups[0].graph.excluded if groups else [])],
        "search": result.stages, **({"method_report": ctx.report} if ctx is not None and ctx.report else {}),
        "mask_overlap": mask_overlap(result.initial_masks, masks) if result.initial_masks is not None else None,
        **({"sparse_train": sparse_report} if sparse_report else {}),
        "finetune_history": history,
        **({"tokens": {**s["tokens"], **new_spec["tokens"], "training": token_records}} if tokens else {}),
    }
    start = time.perf_counter()
    from compress.runs import write_run

    report["stages_s"] = watch.stages
    report["wall_time_s"] = watch.total()
    if rt.is_main:
        write_run(out, module, new_spec, _jsonable(report), extras=result.extras, files=result.files)
    rt.barrier()
    watch.lap("write", start)
    return report


def _prune_channels(module: DeployableModule, bundle: DataBundle, method_obj, s: dict[str, Any], spec: dict,
                    progress: Checkpoint, watch: Stopwatch, dense: dict, tokens: TokenOptions | None,
                    budget: Budget) -> tuple:
    """Groups → the target's cost model → [sparse training] → method search → masks on target → slim →
    (latency: measured) → BN re-estimation → fine-tune, on the ViT inside a token-sparse module when
    there is one (its prediction modules stay as they are). Returns what report.json needs: the
    target's keys, then sparse training's record (None: it did not run). The meter holds the latency
    target's scratch directory."""
    start = time.perf_counter()
    net = backbone_of(module.net)
    groups = find_groups(net, module.normalize(module.example_input(1)))
    watch.lap("groups", start)
    start = time.perf_counter()
    with Meter(budget, module, groups, s["round_to"], say=_say, rt=current()) as meter:
        watch.lap("cost_model", start)
        (masks, estimate, digests, result, ctx, target, sparse_report) = _select(
            module, bundle, method_obj, s, spec, progress, watch, dense, tokens, meter, groups)
        start = time.perf_counter()
        slim(net, groups, masks)
        watch.lap("slim", start)
        if budget.kind == "latency":
            start = time.perf_counter()
            target.update(meter.report(module, estimate))
            watch.lap("latency", start)

    start = time.perf_counter()
    accuracy_slimmed = evaluate(module, bundle.val)
    if s["bn_recalibration"]:
        reestimate_bn(module, bundle.train, s["batch_size"])
    accuracy_before = evaluate(module, bundle.val) if s["bn_recalibration"] else accuracy_slimmed
    history = []
    if s["finetune_epochs"]:
        stage = Fit("fine-tune", s["finetune_epochs"], s["lr"], s["weight_decay"])
        with frozen_predictors(module):   # a token-sparse network fine-tunes with its kept tokens as predicted
            history = run_stage(module, bundle, stage, batch_size=s["batch_size"], seed=s["seed"],
                                checkpoint=progress).history
    watch.lap("finetune", start)
    return (groups, masks, estimate, digests, result, ctx, accuracy_slimmed, accuracy_before, history, target,
            sparse_report)


def _select(module: DeployableModule, bundle: DataBundle, method_obj, s: dict[str, Any], spec: dict,
            progress: Checkpoint, watch: Stopwatch, dense: dict, tokens: TokenOptions | None, meter: Meter,
            groups: list[ChannelGroup]) -> tuple:
    """[Sparse training,] the method's search and the masks that reach the target; `target` collects the
    selection's report keys (calibration rounds, the knapsack's figures)."""
    budget = meter.budget
    lowest = smallest_ratio(groups, meter.cost_model, s["round_to"])
    if tokens is None and budget.ratio < lowest - RATIO_TOLERANCE:
        excluded = groups[0].graph.excluded if groups else []
        dense_part = (f"; {len(excluded)} coupled group(s) cannot be pruned and stay at full width, e.g. "
                      f"{excluded[0][0]}: {excluded[0][1]}" if excluded else "")
        where = f"; {meter.cost_model.describe()}" if budget.kind == "latency" else ""
        raise CompressError(f"{budget.flag} {budget.ratio} is unreachable for {spec['model']} with "
                            f"{step_note(meter.cost_model, s['round_to'])}: the smallest reachable is {lowest:.4f} "
                            f"(every group at its minimum "
                            f"width{dense_part}{where})")
    ctx = PruneContext(module=module, data=bundle, groups=groups, cost_model=meter.cost_model,
                       ratio=max(budget.ratio, lowest),   # just under the floor (allowed above): the floor
                       scope=s["scope"], round_to=s["round_to"], seed=s["seed"], lr=s["lr"],
                       batch_size=s["batch_size"], stopwatch=watch, checkpoint=progress, allocation=s["allocation"])
    sparse_report = None
    if s["sparse"]["epochs"]:
        start = time.perf_counter()
        sparse_report = sparse_train(ctx, SparseConfig.from_record(s["sparse"]), s["weight_decay"])
        sparse_report["wall_s"] = watch.lap("sparse_train", start)
    start = time.perf_counter()
    result = _search(method_obj, ctx, progress)
    watch.lap("search", start)

    start = time.perf_counter()
    target: dict[str, Any] = {}
    masks, estimate = choose_masks(module, groups, result, meter, s["scope"], s["round_to"], s["allocation"],
                                    dense["flops"], target, tokens)
    digests = current().assert_same("the final keep-masks", masks)
    watch.lap("target", start)
    return masks, estimate, digests, result, ctx, target, sparse_report


def _check_tokens(method_cls, flops_ratio: float | None, latency_ratio: float | None,
                  tokens: TokenOptions | None) -> TokenOptions | None:
    """Token options are validated before any work; a method that prunes no channels (dynamicvit) has no
    channel target and gets the default token options."""
    if not method_cls.prunes_channels:
        if flops_ratio is not None or latency_ratio is not None:
            flag = "--flops-ratio" if flops_ratio is not None else "--latency-ratio"
            raise CompressError(f"--method {method_cls.name} prunes tokens only and takes no {flag} (it "
                                "follows from --token-keep); for channels and tokens use a channel method "
                                "with --token-keep")
        tokens = tokens or TokenOptions()
    elif flops_ratio is None and latency_ratio is None:
        raise CompressError(f"--method {method_cls.name} needs --flops-ratio R or --latency-ratio R")
    elif tokens is not None and latency_ratio is not None:
        raise CompressError("--latency-ratio with token sparsification (--token-keep) is not supported yet; "
                            "give --flops-ratio")
    if tokens is not None:
        tokens.check()
    return tokens


def _search(method_obj, ctx: PruneContext, progress: Checkpoint) -> SearchResult:
    """The method's search, or — resuming past it — its recorded result (weights and prompt restored)."""
    saved = progress.result("search")
    if saved is not None:
        from compress.prompt import build_prompt

        if saved["prompt_spec"] is not None:
            ctx.module.prompt = build_prompt(saved["prompt_spec"]).to(ctx.module.normalize.mean.device)
        ctx.module.load_state_dict(saved["module"])
        ctx.report.update(saved["method_report"])
        set_rng(saved["rng"])
        return SearchResult(scores=saved["scores"], masks=saved["masks"], normalize=saved["normalize"],
                            prompt=ctx.module.prompt if saved["prompt_spec"] is not None else None,
                            prompt_spec=saved["prompt_spec"], stages=saved["stages"], extras=saved["extras"],
                            initial_masks=saved.get("initial_masks"), files=saved.get("files", {}))
    result = method_obj.search(ctx)
    if result.prompt is not None:
        if result.prompt_spec is None:
            raise ValueError(f"method {method_obj.name} returned a prompt without its prompt_spec")
        ctx.module.prompt = result.prompt
    progress.save_result("search", {     # written at once: the live weights need no copy
        "scores": result.scores, "masks": result.masks, "normalize": result.normalize,
        "prompt_spec": result.prompt_spec, "stages": _jsonable(result.stages), "extras": result.extras,
        "initial_masks": result.initial_masks,
        "files": result.files,
        "method_report": _jsonable(ctx.report), "rng": get_rng(), "module": ctx.module.state_dict()})
    return result


def _legacy_sparse_options(options: dict[str, Any]) -> dict[str, Any]:
    """DepGraph's sparse-training options from before the pipeline stage (method_options keys
    sparse_train_epochs / sparse_reg = group-lasso strength / sparse_alpha), moved out of `options`."""
    names = {"sparse_train_epochs": "epochs", "sparse_reg": "reg", "sparse_alpha": "alpha"}
    moved = {names[k]: options.pop(k) for k in list(options) if k in names}
    if moved:
        warnings.warn("sparse_train_epochs/sparse_reg/sparse_alpha are prune_run arguments now, not method options",
                      FutureWarning, stacklevel=3)
    return moved


def _check_inputs(out, source, model, budget: Budget | None, scope, round_to, finetune_epochs, lr, batch_size,
                  allocation) -> None:
    """Everything that can be refused before any work is done."""
    if budget is not None:
        budget.check()
    if scope not in SCOPES:
        raise CompressError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if allocation not in ALLOCATIONS:
        raise CompressError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "knapsack" and scope != "global":
        raise CompressError("--allocation knapsack chooses every group's width itself; it needs --scope global "
                            "(or give --allocation rank)")
    if round_to < 1:
        raise CompressError(f"--round-to must be at least 1, got {round_to}")
    if finetune_epochs < 0:
        raise CompressError(f"--finetune-epochs must be ≥ 0, got {finetune_epochs}")
    if lr <= 0 or batch_size < 1:
        raise CompressError("--lr must be > 0 and --batch-size ≥ 1")
    if (source is None) == (model is None):
        raise CompressError("give exactly one of --from DIR (a trained run) or --model NAME")
    out_path = Path(out)
    if out_path.exists() and not (out_path.is_dir() and (is_run(out_path) or not any(out_path.iterdir()))):
        raise CompressError(f"--out {out_path} exists and is not a run directory; choose another path")
    if source is not None:
        read_spec(source)   # refuses a directory that is not a run
        if out_path.resolve() == Path(source).resolve():
            raise CompressError("--out must differ from --from (the dense run would be overwritten)")


def _load_source(source, model, checkpoint, weights, data, image_size, subset, seed
                 ) -> tuple[DeployableModule, dict[str, Any], DataBundle]:
    if source is not None:
        if checkpoint or weights:
            raise CompressError("--checkpoint/--weights go with --model, not with --from")
        module = load(source)
        spec = module.spec
        bundle = load_data(data, image_size=spec["input_size"][1], subset=subset, seed=seed)
        if tuple(bundle.input_size) != tuple(spec["input_size"]):
            raise CompressError(f"{data} gives inputs of size {tuple(bundle.input_size)} but the model in {source} "
                                f"takes {tuple(spec['input_size'])}")
        if bundle.num_classes != spec["num_classes"]:
            raise CompressError(f"{data} has {bundle.num_classes} classes but the model in {source} has "
                                f"{spec['num_classes']}")
        return module.train(), spec, bundle

    from compress.training import build_dense

    return build_dense(model, data, image_size=image_size, subset=subset, seed=seed, weights=weights,
                       checkpoint=checkpoint)


def _say(line: str) -> None:
    from compress.progress import console

    if current().is_main:
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _jsonable(value: Any) -> Any:
    """Method stage records may hold tensors or numpy scalars; report.json needs plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):      # numpy scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _ratio_note(achieved: float, target: float | None, round_to: int) -> str:
    if target is None:
        return "no channel target: the ratio follows from --token-keep"
    if abs(achieved - target) <= RATIO_TOLERANCE:
        return f"within ±{RATIO_TOLERANCE} of the target"
    return f"closest ratio the group widths allow with --round-to {round_to}"


def _dense_reference(module: DeployableModule, spec: dict[str, Any]) -> torch.nn.Module:
    """The dense network model.json's "layers" are recorded against, shapes only (module_copy(meta=True)):
    taken from `module` while it is still the network create_model built, else built once more."""
    if not spec.get("layers") and not spec.get("tokens"):
        return module_copy(module.net, meta=True)
    return module_copy(build_module({**spec, "layers": {}, "prompt": None, "tokens": None}).net, meta=True)


def _pruned_spec(module: DeployableModule, spec: dict[str, Any], reference: torch.nn.Module, bundle: DataBundle,
                 result: SearchResult, tokens: TokenOptions | None = None) -> dict[str, Any]:
    """model.json of the slimmed module, checked by rebuilding it onto a shape-only copy of the dense
    `reference` and loading its weights (names and shapes must match; a rebuild in memory would hold a
    giant's dense weights once more)."""
    net = backbone_of(module.net)
    new_spec = {**spec, "data": bundle.spec, "layers": layer_spec(net, reference), "widths": widths(net)}
    if tokens is not None:
        new_spec["tokens"] = token_spec(module.net, tokens.keep_ratio)
    if result.prompt_spec is not None:
        new_spec["prompt"] = result.prompt_spec
    with torch.device("meta"):
        rebuilt = build_module(new_spec, dense=module_copy(reference, meta=True))
    try:
        rebuilt.load_state_dict(module.state_dict(), strict=True, assign=True)
    except RuntimeError as exc:
        raise RuntimeError(f"the recorded structure does not rebuild the pruned model: {exc}") from None
    return new_spec
