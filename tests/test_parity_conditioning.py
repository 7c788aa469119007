"""Parity when float32 itself is the limit: a failed fp32 comparison is redone against PyTorch in float64.

The module below cancels a large offset after a BatchNorm whose running variance is ~0 (as BN
re-estimation leaves on channels that were nearly constant on the calibration images), so PyTorch's
own float32 output is off from float64 by more than the fp32 tolerance: no float32 backend can match
it to 1e-4. A candidate as close to the exact result as PyTorch fp32 passes, with the cause named; one
that is farther off still fails, and says against what it was compared.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.deploy import DeployableModule
from export.parity import FP32_TOLERANCE, Float64Reference, check_parity, parity_batches, torch_reference


class Cancelling(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)
        with torch.no_grad():
            self.bn.running_var.fill_(1e-7)
        self.register_buffer("offset", torch.tensor(3e6))

    def forward(self, x):
        y = (self.bn(self.conv(x)) + self.offset) - self.offset
        return self.fc(y.mean((2, 3)))


def _setup():
    torch.manual_seed(0)
    module = DeployableModule(Cancelling(), [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16)).eval()
    batches, _ = parity_batches((3, 16, 16), 4)
    return module, batches, Float64Reference(module, batches)


def _as_candidate(outputs: np.ndarray, batches):
    """A callable returning `outputs` batch by batch (padded rows: zeros)."""
    chunks, start = {}, 0
    for x, n in batches:
        chunks[id(x)] = (start, n)
        start += n

    def run(x):
        s, n = chunks[id(x)]
        out = np.zeros((len(x), outputs.shape[1]), dtype=np.float32)
        out[:n] = outputs[s:s + n]
        return out

    return run


def test_float32_limited_network_passes_against_float64_with_the_cause_named():
    module, batches, exact = _setup()
    fp32, fp64 = exact.outputs()
    fp32_error = np.abs(fp32 - fp64).max() / np.abs(fp64).max()
    assert fp32_error > FP32_TOLERANCE / 2, "the module must be float32-limited for this test to mean anything"
    mirrored = (fp64 - (fp32 - fp64)).astype(np.float32)         # as far from exact as PyTorch, other side
    candidate = _as_candidate(mirrored, batches)
    first = check_parity(torch_reference(module), candidate, batches)
    assert not first.passed
    again = exact.recheck(first, candidate, batches)
    assert again.passed and again.reference == "pytorch float64"
    assert abs(again.float32_error - fp32_error) < 1e-9
    assert "ill-conditioned" in again.cause and "bn" in again.cause and "BatchNorm channels" in again.cause
    assert "against PyTorch float64" in again.summary()


def test_a_wrong_file_still_fails_against_float64():
    module, batches, exact = _setup()
    _fp32, fp64 = exact.outputs()
    candidate = _as_candidate((fp64 * 1.05).astype(np.float32), batches)
    first = check_parity(torch_reference(module), candidate, batches)
    again = exact.recheck(first, candidate, batches)
    assert not again.passed and again.max_rel > 0.04
    assert "against PyTorch float64" in again.summary() and "cause: " in again.summary()
