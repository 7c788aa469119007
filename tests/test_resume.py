"""SIGTERM during the search, --resume, SIGTERM during fine-tuning, --resume: the uninterrupted result, bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from compress.checkpoint import partial_dir

PRUNE = ["prune", "--data", "digits", "--method", "vpns", "--flops-ratio", "0.5", "--round-to", "1",
         "--finetune-epochs", "3", "--warmup-epochs", "1", "--score-epochs", "2", "--subset", "240",
         "--batch-size", "32", "--device", "cpu"]
COMPARED = ("accuracy", "accuracy_before_finetune", "accuracy_slimmed", "flops", "widths", "mask_digests")


def _compress(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "compress", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _progress(out: Path) -> dict:
    try:
        return torch.load(partial_dir(out) / "state.pt", weights_only=True)
    except Exception:  # not written yet, or being replaced this instant
        return {}


def _terminate_when(proc: subprocess.Popen, out: Path, reached) -> str:
    """SIGTERM `proc` as soon as its checkpoint shows `reached`; its stderr."""
    while proc.poll() is None:
        if reached(_progress(out)):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "resume with: compress prune" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists() and partial_dir(out).is_dir()                # nothing at --out, progress kept
    return err


def _finished(args: list[str], cwd: Path, out: str, *more: str) -> dict:
    """Run `compress *args --out out *more` to the end; its report."""
    proc = _compress(*args, "--out", out, *more, cwd=cwd)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-2000:]
    return json.loads((cwd / out / "report.json").read_text())


def _strip_times(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in history]


def test_sigterm_in_search_and_in_finetuning_then_resume_gives_the_uninterrupted_run(digits_run, tmp_path):
    src = str(digits_run)
    expected = _finished([*PRUNE, "--from", src], tmp_path, "whole")

    out = tmp_path / "stopped"
    # 1. after the warm-up finished: the process is in the mask search
    in_search = lambda st: st.get("stages", {}).get("vpns warm-up", {}).get("done", False)  # noqa: E731
    err = _terminate_when(_compress(*PRUNE, "--from", src, "--out", "stopped", cwd=tmp_path), out, in_search)
    assert "stage vpns" in err
    # 2. resumed, and stopped again after its first fine-tuning epoch: the process is in the second
    in_finetune = lambda st: st.get("stages", {}).get("fine-tune", {}).get("epoch", 0) >= 1  # noqa: E731
    _terminate_when(_compress(*PRUNE, "--from", src, "--out", "stopped", "--resume", cwd=tmp_path), out, in_finetune)
    # 3. resumed to the end
    last = _compress(*PRUNE, "--from", src, "--out", "stopped", "--resume", cwd=tmp_path)
    assert last.wait(timeout=900) == 0, last.stderr.read()[-2000:]

    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] is True and not partial_dir(out).exists()
    for key in COMPARED:
        assert report[key] == expected[key], key
    assert _strip_times(report["finetune_history"]) == _strip_times(expected["finetune_history"])
    a = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    b = torch.load(out / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)       # bit-identical on the CPU


LBI = ["prune", "--data", "digits", "--method", "dessilbi", "--flops-ratio", "0.5", "--round-to", "1",
       "--finetune-epochs", "0", "--lbi-epochs", "2", "--subset", "240", "--batch-size", "32", "--device", "cpu"]


def test_sigterm_in_the_dessilbi_path_then_resume_gives_the_same_path_and_masks(digits_run, tmp_path):
    """Split LBI's V, entry steps and thresholds live in its optimiser state: a resumed path is the same path."""
    src = str(digits_run)
    expected = _finished([*LBI, "--from", src], tmp_path, "whole")

    out = tmp_path / "stopped"
    in_path = lambda st: st.get("stages", {}).get("dessilbi", {}).get("epoch", 0) >= 1  # noqa: E731
    _terminate_when(_compress(*LBI, "--from", src, "--out", "stopped", cwd=tmp_path), out, in_path)
    report = _finished([*LBI, "--from", src], tmp_path, "stopped", "--resume")
    assert report["resumed"] is True
    for key in ("mask_digests", "widths", "accuracy", "flops"):
        assert report[key] == expected[key], key
    got, want = report["method_report"]["dessilbi"], expected["method_report"]["dessilbi"]
    assert got["path"] == want["path"] and got["entry_epochs"] == want["entry_epochs"]
    assert (out / "dessilbi_path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
