"""Streaming-data benchmark: an image folder too big to hold decoded, one training epoch per loader setting.

    python -m bench.streaming --images 20000 --size 64 --workers 0,2

Generates (once) an ImageFolder of JPEGs (`DIR/train/<class>/*.jpg`, `DIR/val/<class>/*.jpg`: seeded
colour textures, ten classes), then runs `compress train ... --epochs 1 --workers W` in a fresh process for
each W, side by side, and prints per setting the training epoch's time and throughput (from the run's
report.json) and the peak resident memory of the whole job (the training process plus its loader
workers, sampled every 0.1 s from /proc; shared pages are counted once per process, so it is an upper
bound). The figures are printed and, with --json, recorded; nothing here is a pass/fail test.
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


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (0 when gone)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def train_once(folder: Path, model: str, size: int, workers: int, batch_size: int) -> dict:
    """One epoch of `compress train` in a fresh process; its epoch time, throughput and peak tree RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "compress", "train", "--model", model, "--data", f"imagefolder:{folder}",
               "--image-size", str(size), "--epochs", "1", "--batch-size", str(batch_size), "--workers", str(workers),
               "--device", "cpu", "--out", str(out)]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.1)
        err = proc.stderr.read()
        if proc.returncode:
            raise click.ClickException(f"compress train failed (workers {workers}): {err.strip()[-500:]}")
        report = json.loads((out / "report.json").read_text())
    epoch = report["history"][0]
    return {"workers": workers, "train_images": report["train_size"], "epoch_s": epoch["time_s"],
            "images_per_s": round(report["train_size"] / epoch["time_s"], 1), "peak_rss_gb": round(peak / 2**30, 3),
            "process_wall_s": round(time.perf_counter() - started, 1)}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--images", default=20000, show_default=True, help="Training images in the generated folder.")
@click.option("--size", default=64, show_default=True, help="Image size in px (JPEGs are stored at this size).")
@click.option("--workers", "workers_list", default="0,2", show_default=True, help="Comma list of --workers values.")
@click.option("--model", default="mobilenet_v3_small", show_default=True, help="Model to train one epoch.")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--dir", "folder", default=str(Path(tempfile.gettempdir()) / "compress-streaming"), show_default=True,
              type=click.Path(), help="Where the image folder is generated (reused when complete).")
@click.option("--json", "json_path", type=click.Path(), help="Record the figures here.")
def main(images: int, size: int, workers_list: str, model: str, batch_size: int, folder: str,
         json_path: str | None) -> None:
    """One training epoch over a generated JPEG image folder per --workers setting: time, throughput, memory."""
    root = Path(folder)
    started = time.perf_counter()
    make_folder(root, images, size)
    click.echo(f"image folder {root}: {images} training JPEGs at {size} px "
               f"(ready in {time.perf_counter() - started:.0f} s)", err=True)
    rows = []
    for w in (int(v) for v in workers_list.split(",")):
        click.echo(f"training one epoch with --workers {w} ...", err=True)
        rows.append(train_once(root, model, size, w, batch_size))
    base = rows[0]["images_per_s"]
    click.echo(f"{'workers':>7}  {'epoch s':>8}  {'images/s':>9}  {'× workers ' + str(rows[0]['workers']):>12}  "
               f"{'peak RSS (GB)':>13}")
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / base, 3)
        click.echo(f"{r['workers']:>7}  {r['epoch_s']:>8.1f}  {r['images_per_s']:>9.1f}  {r['speedup']:>11.2f}×  "
                   f"{r['peak_rss_gb']:>13.2f}")
    if json_path:
        from compress.files import write_atomic

        record = {"images": images, "size": size, "model": model, "batch_size": batch_size, "cpus": os.cpu_count(),
                  "loadavg": list(os.getloadavg()), "rows": rows}
        write_atomic(Path(json_path), (json.dumps(record, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
