import pytest
import torch

from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.models import create_model
from compress.prompt import build_prompt, make_prompt, prompt_spec
from compress.runs import build_spec, load, write_run


@pytest.mark.parametrize("training", [True, False])
def test_zero_pad_prompt_leaves_the_image_bit_identical_at_full_resolution(training):
    p = make_prompt("pad", 224).train(training)
    assert p.size == 16                                       # the reference's 16 px frame at 224 px
    x = torch.rand(2, 3, 224, 224)
    x[0, :, :5] = 0.0                                         # black and white borders sit on the clamp bounds
    x[1, :, -5:] = 1.0
    assert torch.equal(p(x), x)


def test_pad_prompt_adds_the_frame_over_the_image_border_only():
    p = make_prompt("pad", 16, 2)
    with torch.no_grad():
        p.delta.fill_(0.25)
    x = torch.full((1, 3, 16, 16), 0.5)
    y = p(x).detach()
    assert torch.equal(y[..., 2:14, 2:14], x[..., 2:14, 2:14]) and float(y[..., :2, :].min()) == 0.75


def test_resize_pad_prompt_starts_as_resize_and_pad_and_learns_only_the_frame():
    p = make_prompt("resize-pad", 16, 2)
    x = torch.rand(2, 3, 16, 16)
    y = p(x)
    assert y.shape == x.shape and float(y[..., :2, :].detach().abs().max()) == 0.0  # zero frame at init
    y.sum().backward()
    grad = p.delta.grad
    assert float(grad[..., 2:14, 2:14].abs().max()) == 0.0 and float(grad[..., :2, :].abs().min()) > 0


def test_additive_prompt_clamps_to_unit_range():
    p = make_prompt("additive", 8)
    with torch.no_grad():
        p.delta.fill_(2.0)
    assert float(p(torch.rand(1, 3, 8, 8)).detach().min()) == 1.0


def test_prompt_size_is_validated():
    with pytest.raises(CompressError, match="--prompt-size"):
        make_prompt("pad", 16, 8)


def test_old_pad_spec_rebuilds_the_shrinking_prompt_it_meant():
    assert type(build_prompt({"kind": "pad", "image_size": 16, "size": 2})).__name__ == "ResizePadPrompt"
    assert type(build_prompt({"kind": "pad", "version": 2, "image_size": 16, "size": 2})).__name__ == "PadPrompt"


@pytest.mark.parametrize("kind", ["pad", "resize-pad", "additive"])
def test_prompt_saved_and_reloaded_exactly(tmp_path, kind):
    prompt = make_prompt(kind, 16)
    with torch.no_grad():
        prompt.delta.normal_()
    module = DeployableModule(create_model("resnet20", 10, 16), [0.5] * 3, [0.25] * 3, prompt=prompt,
                              input_size=(3, 16, 16)).eval()
    spec = build_spec("resnet20", 10, (3, 16, 16), [0.5] * 3, [0.25] * 3, adapt=None, data="synthetic")
    spec["prompt"] = prompt_spec(prompt)
    write_run(tmp_path / "run", module, spec, {"command": "train"})
    loaded = load(tmp_path / "run")
    assert torch.equal(loaded.prompt.delta, prompt.delta)
    x = torch.rand(3, 3, 16, 16)
    assert torch.equal(loaded(x), module(x))
    assert build_prompt(spec["prompt"]).spec() == spec["prompt"]
