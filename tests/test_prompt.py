import pytest
import torch

from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.models import create_model
from compress.prompt import build_prompt, make_prompt, prompt_spec
from compress.runs import build_spec, load, write_run


def test_pad_prompt_starts_as_resize_and_pad_and_learns_only_the_frame():
    p = make_prompt("pad", 16, 2)
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


@pytest.mark.parametrize("kind", ["pad", "additive"])
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
