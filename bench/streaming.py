"""Streaming-data benchmark: an image folder too big to hold decoded, one training epoch per loader setting.

    python -m bench.streaming --images 20000 --size 64 --workers 0,2

Generates (once) an ImageFolder of JPEGs (`DIR/train/<class>/*.jpg`, `DIR/val/<class>/*.jpg`: seeded
colour textures, ten classes), then for each W, side by side, in fresh processes:

- `compress train ... --epochs 1 --workers W`: the training epoch's time and throughput (from the run's
  report.json);
- the same epoch of the loader alone (the stages' own `compress.batches.batches`, shuffled and augmented,
  no model): what the streaming pipeline delivers when the model runs elsewhere (a GPU). On a CPU-only
  machine the workers share the cores with the training step, so the training ratio is bounded by the
  decode share of an image's cost (Amdahl); the loader ratio is the pipeline's own scaling.

Memory is sampled every 0.1 s from /proc over the process and its loader workers: peak PSS (each shared
page counted once over the processes: the job's real footprint) and peak RSS (shared pages counted once
per process — forked workers share the parent's torch — an upper bound). The figures are printed and,
with --json, recorded; nothing here is a pass/fail test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

CLASSES = 10


def make_folder(root: Path, images: int, size: int, val: int = 500) -> Path:
    """`images` training JPEGs and `val` validation JPEGs of `size` px; kept if already complete."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{images} {size} {val}":
        return root
    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (CLASSES, 8, 8, 3), dtype=np.uint8)
    for split, n in (("train", images), ("val", val)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            c = i % CLASSES
            base = np.asarray(Image.fromarray(protos[c]).resize((size, size), Image.BILINEAR), dtype=np.int16)
            noisy = np.clip(base + rng.integers(-40, 41, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / split / f"c{c}" / f"{i:06d}.jpg", quality=90)
    done.write_text(f"{images} {size} {val}")
    return root


def _tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) bytes of `pid` and all its descendants ((0, 0) when gone)."""
    pss, rss, stack = 0, 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {k: int(v.split()[0]) * 1024 for k, v in (ln.split(":", 1) for ln in f if ":" in ln)
                          if k in ("Pss", "Rss")}
            pss, rss = pss + fields.get("Pss", 0), rss + fields.get("Rss", 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError):
            continue
    return pss, rss


def _watch(cmd: list[str], what: str) -> tuple[str, int, int]:
    """Run `cmd`; its stdout and the peak PSS and RSS of its process tree."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    while proc.poll() is None:
        pss, rss = _tree_memory(proc.pid)
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode:
        raise click.ClickException(f"{what} failed: {err.strip()[-500:]}")
    return out, peak_pss, peak_rss


def train_once(folder: Path, model: str, size: int, workers: int, batch_size: int, device: str = "cpu") -> dict:
    """One epoch of `compress train` in a fresh process; its epoch time, throughput and peak memory."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "compress", "train", "--model", model, "--data", f"imagefolder:{folder}",
               "--image-size", str(size), "--epochs", "1", "--batch-size", str(batch_size), "--workers", str(workers),
               "--device", device, "--out", str(out)]
        _, pss, rss = _watch(cmd, f"compress train (workers {workers})")
        report = json.loads((out / "report.json").read_text())
    epoch = report["history"][0]
    return {"workers": workers, "train_images": report["train_size"], "epoch_s": epoch["time_s"],
            "images_per_s": round(report["train_size"] / epoch["time_s"], 1),
            "peak_pss_gb": round(pss / 2**30, 3), "peak_rss_gb": round(rss / 2**30, 3)}


def loader_once(folder: Path, size: int, workers: int, batch_size: int) -> dict:
    """One shuffled, augmented epoch of the training split through the stages' loader alone, in a fresh process."""
    code = ("import time; from compress.data import load_data; from compress.batches import batches; "
            "from compress.runtime import Runtime; "
            f"d = load_data('imagefolder:{folder}', image_size={size}); rt = Runtime(workers={workers}); "
            f"next(iter(batches(d.train, {batch_size}, rt=rt, limit=1))); t = time.perf_counter(); "
            f"n = sum(len(y) for _, y in batches(d.train, {batch_size}, shuffle=True, seed=0, augment=True, rt=rt)); "
            "print(n, time.perf_counter() - t)")
    out, pss, rss = _watch([sys.executable, "-c", code], f"the loader epoch (workers {workers})")
    n, seconds = out.split()[-2:]
    return {"workers": workers, "epoch_s": round(float(seconds), 2),
            "images_per_s": round(int(n) / float(seconds), 1),
            "peak_pss_gb": round(pss / 2**30, 3), "peak_rss_gb": round(rss / 2**30, 3)}


def _table(title: str, rows: list[dict]) -> None:
    base = rows[0]["images_per_s"]
    click.echo(title)
    click.echo(f"{'workers':>7}  {'epoch s':>8}  {'images/s':>9}  {'× workers ' + str(rows[0]['workers']):>12}  "
               f"{'peak PSS (GB)':>13}  {'peak RSS (GB)':>13}")
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / base, 3)
        click.echo(f"{r['workers']:>7}  {r['epoch_s']:>8.1f}  {r['images_per_s']:>9.1f}  {r['speedup']:>11.2f}×  "
                   f"{r['peak_pss_gb']:>13.2f}  {r['peak_rss_gb']:>13.2f}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", default=20000, show_default=True, help="Training images in the generated folder.")
@click.option("--size", default=64, show_default=True, help="Image size in px (JPEGs are stored at this size).")
@click.option("--workers", "workers_list", default="0,2", show_default=True, help="Comma list of --workers values.")
@click.option("--model", default="mobilenet_v3_small", show_default=True, help="Model to train one epoch.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--device", default="cpu", show_default=True,
              help="Where the model trains (cpu, cuda, cuda:N). Off the CPU, decoding is what limits the epoch, "
                   "which is where loader processes pay.")
@click.option("--dir", "folder", default=str(Path(tempfile.gettempdir()) / "compress-streaming"), show_default=True,
              type=click.Path(), help="Where the image folder is generated (reused when complete).")
@click.option("--json", "json_path", type=click.Path(), help="Record the figures here.")
def main(images: int, size: int, workers_list: str, model: str, batch_size: int, device: str, folder: str,
         json_path: str | None) -> None:
    """One training epoch and one loader-only epoch over a generated JPEG folder per --workers setting."""
    root = Path(folder)
    started = time.perf_counter()
    make_folder(root, images, size)
    click.echo(f"image folder {root}: {images} training JPEGs at {size} px "
               f"(ready in {time.perf_counter() - started:.0f} s)", err=True)
    rows, loader_rows = [], []
    for w in (int(v) for v in workers_list.split(",")):
        click.echo(f"one training epoch and one loader-only epoch with --workers {w} ...", err=True)
        rows.append(train_once(root, model, size, w, batch_size, device))
        loader_rows.append(loader_once(root, size, w, batch_size))
    _table(f"training ({model}, batch {batch_size}, {device})", rows)
    _table("loader alone (decode, augment, batch; no model)", loader_rows)
    if json_path:
        from compress.files import write_atomic

        record = {"images": images, "size": size, "model": model, "batch_size": batch_size, "device": device,
                  "cpus": os.cpu_count(),
                  "loadavg": list(os.getloadavg()),
                  "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
                  "rows": rows, "loader_rows": loader_rows}
        write_atomic(Path(json_path), (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
