"""timm classifiers as `timm:NAME` (timm 1.x from PyPI; nothing is ever downloaded).

`timm:NAME` builds timm's `NAME` with random initialisation; `--checkpoint FILE` loads a state_dict
into it as for any model; `--weights pretrained` loads timm's published weights for NAME (or for the
tag in `timm:NAME.TAG`) only from where timm would have cached them before (the Hugging Face hub
cache or torch.hub's checkpoint directory), and otherwise says where it looked. Models whose
input size is part of the architecture (ViT, DeiT, Swin: timm's `fixed_input_size`) are built for
the run's image size, so model.json's input size rebuilds them exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from compress.errors import CompressError

PREFIX = "timm:"


class TimmFamily:
    """Every classifier timm lists, as `timm:NAME`."""

    def names(self) -> list[str]:
        timm = _timm()
        return [PREFIX + n for n in timm.list_models()] if timm else []

    def owns(self, name: str) -> bool:
        if not name.startswith(PREFIX):
            return False
        timm = _timm()
        if timm is None:
            raise CompressError(f"{name} needs timm: pip install 'timm>=1.0'")
        return timm.is_model(name[len(PREFIX):].split(".")[0])

    def default_adapt(self, name: str, image_size: int) -> str | None:
        return None

    def normalization(self, name: str, weights: str | None) -> tuple[list[float], list[float]] | None:
        """The input statistics timm's pretrained weights expect (None without weights)."""
        import timm

        cfg = timm.get_pretrained_cfg(name[len(PREFIX):])
        return (list(cfg.mean), list(cfg.std)) if weights and cfg is not None else None

    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None, weights: str | None) -> nn.Module:
        import timm

        if adapt is not None:
            raise CompressError(f"unknown model adaptation {adapt!r} for {name} in model.json")
        arch = name[len(PREFIX):]
        kwargs = {"num_classes": num_classes}
        cfg = timm.get_pretrained_cfg(arch)
        if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (image_size, image_size):
            kwargs["img_size"] = image_size
        if weights:
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(cached_weights(arch, weights))})
        try:
            return timm.create_model(arch, **kwargs)
        except Exception as exc:  # model constructors reject sizes and options in many ways
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CompressError(f"cannot build {name} at {image_size} px: {detail}") from None


def cached_weights(arch: str, weights: str) -> Path:
    """The local file of timm's pretrained weights for `arch` (a timm name, optionally NAME.TAG)."""
    import timm

    if weights not in ("pretrained", "timm"):
        raise CompressError(f"--weights for timm models is 'pretrained' (timm's weights for the name or "
                            f"its .TAG, from the local cache), got {weights!r}")
    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        raise CompressError(f"timm publishes no weights for {arch}")
    looked = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        looked.append(f"the Hugging Face cache ({cfg.hf_hub_id})")
    if cfg.url:
        import torch.hub

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return path
        looked.append(str(path))
    raise CompressError(f"timm weights for {arch} are not cached on this machine (looked in {' and '.join(looked)}); "
                        "nothing is downloaded: fetch them once where there is internet, or pass --checkpoint FILE")


def _timm():
    try:
        import timm
    except ImportError:
        return None
    return timm
