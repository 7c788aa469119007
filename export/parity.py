"""Numerical parity: does an exported file compute what the PyTorch module computes?

Errors are measured relative to the output scale (the largest |logit| of the reference), so one
tolerance serves models whose logits are 0.1 or 100. Top-1 agreement is reported alongside because
it is what a user of a classifier notices first, and because fp16 can stay within a loose
tolerance while flipping near-tied predictions.

When an fp32 file misses the tolerance against fp32 PyTorch, the comparison is repeated against
PyTorch in float64 (`Float64Reference`), which tells an export that computes something else from a
network that float32 cannot reproduce to the tolerance at all. A slimmed network whose BatchNorm
statistics were re-estimated can be such a network: depthwise channels whose variance on the
calibration images is tiny (≈ eps) get gains of hundreds, and on the seeded noise inputs, far
outside that distribution, activations grow to 10^4 and rounding differences with them (PyTorch's
own fp32 result then differs from float64 by ~1e-3). The file passes if it is at most
CONDITIONING_FACTOR times farther from the float64 result than PyTorch's fp32 is (and within the
tolerance of it otherwise), and the result says so; if not, the message names the cause.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

# Tolerances on max |ref - got| / max |ref|, per backend precision.
FP32_TOLERANCE = 1e-4  # ONNX Runtime fp32 vs PyTorch fp32 (deploy.md)
TENSORRT_FP32_TOLERANCE = 1e-3  # TensorRT fp32 picks other kernels (Winograd, fused epilogues)
FP16_TOLERANCE = 2e-2  # fp16 carries ~3 decimal digits; errors grow with depth

CONDITIONING_FACTOR = 2.0  # an fp32 file may be this many times farther from float64 than PyTorch fp32 is
AMPLIFYING_GAIN = 100.0  # BatchNorm channels scaling by more than this are named as the cause
SCALE_FLOOR = 1e-6  # all-zero reference outputs (e.g. an untrained zero-initialised head): compare absolutely
SEEDED_SAMPLES = 16
REFERENCE_CHUNK = 64
DATA_SAMPLES = 256


@dataclass
class Parity:
    """The outcome of one comparison; `passed` is `max_rel <= tolerance`, or, against float64, `max_rel` within
    CONDITIONING_FACTOR × `float32_error` (see the module docstring)."""

    max_abs: float
    max_rel: float
    top1_agreement: float
    n_samples: int
    tolerance: float
    passed: bool
    inputs: str = ""  # what was compared, e.g. "16 seeded + 256 val images of digits"
    # Token-sparse models: share of samples whose kept-token indices agree at every stage (None: no such outputs).
    indices_agreement: float | None = None
    reference: str = "pytorch"      # "pytorch float64" when compared against the exact result (see module doc)
    float32_error: float | None = None  # PyTorch fp32's own max rel error against float64, when measured
    cause: str | None = None        # why fp32 PyTorch itself cannot be matched to the tolerance, when known

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        indices = "" if self.indices_agreement is None else \
            f", kept-token indices identical on {self.indices_agreement:.2%}"
        text = (f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} (tolerance {self.tolerance:g}), "
                f"top-1 agreement {self.top1_agreement:.2%}{indices} on {self.n_samples} samples")
        if self.float32_error is not None:
            text += (f"; against PyTorch float64, where PyTorch's own fp32 result is off by {self.float32_error:.3g}"
                     f" (allowed: {CONDITIONING_FACTOR:g}× that)")
        return text + (f"; cause: {self.cause}" if self.cause else "")

    def with_indices(self, agreement: float) -> Parity:
        """This result with the kept-token index check added: identical indices are required to pass."""
        return replace(self, indices_agreement=agreement, passed=self.passed and agreement == 1.0)


def compare(reference: np.ndarray, candidate: np.ndarray, tolerance: float, inputs: str = "") -> Parity:
    """Compare two [N, classes] output arrays."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        return Parity(float("inf"), float("inf"), 0.0, int(reference.shape[0]) if reference.ndim else 0,
                      tolerance, False, f"{inputs} (output shape {candidate.shape} != {reference.shape})")
    diff = np.abs(reference - candidate)
    max_abs = float(diff.max()) if diff.size else 0.0
    if not np.isfinite(candidate).all():
        max_abs = float("inf")
    scale = max(float(np.abs(reference).max()) if reference.size else 0.0, SCALE_FLOOR)
    max_rel = max_abs / scale
    n = int(reference.shape[0])
    agree = float((reference.reshape(n, -1).argmax(1) == candidate.reshape(n, -1).argmax(1)).mean()) if n else 1.0
    return Parity(max_abs, max_rel, agree, n, tolerance, bool(max_rel <= tolerance), inputs)


def check_parity(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                 batches: Iterable[tuple[np.ndarray, int]], *, tolerance: float = FP32_TOLERANCE,
                 inputs: str = "") -> Parity:
    """Run `candidate` on every batch and `reference` on the same images; compare the real rows.

    `batches` yields (x, n_real): a batch padded to a file's fixed batch size keeps its padding
    out of the figures. The reference runs in chunks of REFERENCE_CHUNK whatever the file's batch
    size (eager PyTorch at batch 1 is slow, and its result does not depend on the batching).
    """
    real, got = [], []
    for x, n_real in batches:
        real.append(x[:n_real])
        got.append(np.asarray(candidate(x))[:n_real])
    images = np.concatenate(real)
    ref = np.concatenate([np.asarray(reference(images[i:i + REFERENCE_CHUNK]))
                          for i in range(0, len(images), REFERENCE_CHUNK)])
    return compare(ref, np.concatenate(got), tolerance, inputs)


def index_agreement(reference: Callable[[np.ndarray], list[np.ndarray]],
                    candidate: Callable[[np.ndarray], list[np.ndarray]],
                    batches: Iterable[tuple[np.ndarray, int]]) -> float:
    """Share of the real samples whose integer outputs (a token-sparse model's kept indices, one array per
    stage) are identical between `reference` and `candidate` at every stage."""
    same = total = 0
    for x, n_real in batches:
        ref, got = reference(x), candidate(x)
        if len(ref) != len(got):
            return 0.0
        rows = np.ones(n_real, dtype=bool)
        for r, g in zip(ref, got, strict=True):
            r, g = np.asarray(r)[:n_real], np.asarray(g)[:n_real]
            rows &= (r == g).reshape(n_real, -1).all(1) if r.shape == g.shape else False
        same += int(rows.sum())
        total += n_real
    return same / max(1, total)


class Float64Reference:
    """PyTorch's fp32 and float64 outputs on the parity images, computed once, on first use (a float64
    copy of the module exists only meanwhile)."""

    def __init__(self, module: torch.nn.Module, batches: list[tuple[np.ndarray, int]]):
        self.module = module
        self.images = np.concatenate([x[:n] for x, n in batches])
        self._outputs: tuple[np.ndarray, np.ndarray] | None = None

    def outputs(self) -> tuple[np.ndarray, np.ndarray]:
        if self._outputs is None:
            import copy

            exact = copy.deepcopy(self.module).double().eval()
            fp32, fp64 = [], []
            with torch.inference_mode():
                for i in range(0, len(self.images), REFERENCE_CHUNK):
                    x = torch.from_numpy(self.images[i:i + REFERENCE_CHUNK])
                    fp32.append(self.module(x).double().numpy())
                    fp64.append(exact(x.double()).numpy())
            del exact
            self._outputs = np.concatenate(fp32), np.concatenate(fp64)
        return self._outputs

    def recheck(self, parity: Parity, candidate: Callable[[np.ndarray], np.ndarray],
                batches: Iterable[tuple[np.ndarray, int]]) -> Parity:
        """`parity` (a failed fp32 comparison) redone against float64, with the cause when fp32 is the limit."""
        got = np.concatenate([np.asarray(candidate(x))[:n] for x, n in batches]).astype(np.float64)
        fp32, fp64 = self.outputs()
        if not (np.isfinite(got).all() and np.isfinite(fp64).all()) or got.shape != fp64.shape:
            return parity
        scale = max(float(np.abs(fp64).max()), SCALE_FLOOR)
        fp32_error = float(np.abs(fp32 - fp64).max()) / scale
        allowed = max(parity.tolerance, CONDITIONING_FACTOR * fp32_error)
        exact = compare(fp64, got, allowed, parity.inputs)
        cause = None
        if fp32_error > parity.tolerance / CONDITIONING_FACTOR:
            cause = (f"the network is numerically ill-conditioned on these inputs (outputs up to {scale:.3g}; "
                     f"PyTorch's own float32 result is off by {fp32_error:.3g} from float64)")
            cause += amplifying_norms(self.module)
        return replace(exact, tolerance=parity.tolerance, reference="pytorch float64", float32_error=fp32_error,
                       cause=cause)


def amplifying_norms(module: torch.nn.Module) -> str:
    """'; N BatchNorm channels …' naming BatchNorm layers that multiply by more than AMPLIFYING_GAIN, or ''."""
    count, worst = 0, None
    for name, mod in module.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.running_var is not None:
            weight = mod.weight.detach().abs() if mod.weight is not None else torch.ones_like(mod.running_var)
            gain = weight / torch.sqrt(mod.running_var + mod.eps)
            count += int((gain > AMPLIFYING_GAIN).sum())
            i = int(gain.argmax())
            if worst is None or float(gain[i]) > worst[1]:
                worst = (name, float(gain[i]), float(mod.running_var[i]), mod.eps)
    if not count:
        return ""
    name, gain, var, eps = worst
    return (f"; {count} BatchNorm channels multiply by more than {AMPLIFYING_GAIN:g}× (e.g. {name}: ×{gain:.0f}, "
            f"running variance {var:.2g} with eps {eps:g}): their statistics were estimated on images whose "
            "variance there is tiny; check parity on such images with --data")


def torch_reference(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch module as a numpy → numpy function (CPU, fp32, no grad)."""

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).float().numpy()

    return run


def parity_batches(input_size: tuple[int, int, int], batch_size: int | None, data=None,
                   n_seeded: int = SEEDED_SAMPLES, n_data: int = DATA_SAMPLES,
                   seed: int = 0) -> tuple[list[tuple[np.ndarray, int]], str]:
    """Seeded uniform [0, 1] images, plus real validation images when a DataBundle is given.

    With a fixed `batch_size` every batch has exactly that many rows (the last one padded);
    with None (dynamic batch) batches of 16 are used, the last one shorter.
    """
    g = torch.Generator().manual_seed(seed)
    seeded = torch.rand((n_seeded, *input_size), generator=g).numpy()
    chunks = [seeded]
    described = f"{n_seeded} seeded"
    if data is not None:
        images = _val_images(data, input_size, n_data)
        chunks.append(images)
        described += f" + {len(images)} val images of {data.spec}"
    batches = [b for chunk in chunks for b in _fixed_batches(chunk, batch_size or 16, pad=batch_size is not None)]
    return batches, described


def _val_images(data, input_size: tuple[int, int, int], n: int) -> np.ndarray:
    from compress.errors import CompressError

    split = data.val if len(data.val) else data.train
    idx = torch.arange(min(n, len(split)))
    x, _ = split.batch(idx)
    if tuple(x.shape[1:]) != tuple(input_size):
        raise CompressError(f"--data {data.spec} gives images of {list(x.shape[1:])}, but the model takes "
                            f"{list(input_size)}; pass data at the model's input size")
    return x.numpy().astype(np.float32)


def _fixed_batches(x: np.ndarray, batch_size: int, pad: bool) -> Iterator[tuple[np.ndarray, int]]:
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        n_real = len(chunk)
        if pad and n_real < batch_size:
            filler = np.zeros((batch_size - n_real, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, filler])
        yield np.ascontiguousarray(chunk, dtype=np.float32), n_real
