"""Every torchvision classifier by its own name, with a small-input stem for ResNets and DenseNets."""

from __future__ import annotations

from torch import nn

from compress.errors import CompressError

SMALL_INPUT_PX = 64
# GoogLeNet and Inception-v3 are built without their auxiliary classifiers: those run only in training
# mode (so channel analysis, which traces in eval mode, never sees them and their inputs would not be
# slimmed) and only regularise the original ImageNet schedule. init_weights=False: PyTorch's default
# initialisation, without torchvision's warning that its scipy-based one is slow and going away.
AUX_HEADS = {"googlenet": {"aux_logits": False, "init_weights": False},
             "inception_v3": {"aux_logits": False, "init_weights": False}}


class TorchvisionFamily:
    """torchvision.models classifiers. Inputs of SMALL_INPUT_PX or less give ResNets and DenseNets a
    3×3 stride-1 stem without max-pool ("cifar-stem"), so early stride-2 stages do not erase the image."""

    def names(self) -> list[str]:
        from torchvision import models as tvm

        return list(tvm.list_models(module=tvm))

    def owns(self, name: str) -> bool:
        return name in self.names()

    def default_adapt(self, name: str, image_size: int) -> str | None:
        if image_size > SMALL_INPUT_PX:
            return None
        if name.startswith(("resnet", "resnext", "wide_resnet", "densenet")):
            return "cifar-stem"
        return None

    def normalization(self, name: str, weights: str | None) -> tuple[list[float], list[float]] | None:
        """torchvision's ImageNet weights expect ImageNet's channel statistics."""
        return ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if weights else None

    def create(self, name: str, num_classes: int, image_size: int, adapt: str | None, weights: str | None) -> nn.Module:
        from torchvision import models as tvm

        # torchvision ViTs bake the input size into their position embedding.
        kwargs = {"image_size": image_size} if name.startswith("vit_") else {}
        if name in AUX_HEADS:
            kwargs.update(AUX_HEADS[name])
        if weights:
            try:
                net = tvm.get_model(name, weights=weights, **AUX_HEADS.get(name, {}))
            except Exception as exc:
                raise CompressError(f"cannot load torchvision weights {weights!r} for {name}: {exc}") from None
            replace_classifier(net, num_classes)
        else:
            try:
                net = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
            except Exception as exc:
                raise CompressError(f"cannot build {name} at {image_size} px: {exc}") from None
        _apply_adapt(name, net, adapt)
        return net


def _apply_adapt(name: str, net: nn.Module, adapt: str | None) -> None:
    if adapt is None:
        return
    if adapt != "cifar-stem":
        raise CompressError(f"unknown model adaptation {adapt!r} in model.json")
    if name.startswith("densenet"):
        feats = net.features
        feats.conv0 = nn.Conv2d(3, feats.conv0.out_channels, 3, 1, 1, bias=False)
        feats.pool0 = nn.Identity()
    elif hasattr(net, "conv1") and hasattr(net, "maxpool"):
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    else:
        raise CompressError(f"adaptation 'cifar-stem' does not apply to model {name!r}")


def replace_classifier(net: nn.Module, num_classes: int) -> None:
    """Swap the last Linear for one with `num_classes` outputs (pretrained weights, new task)."""
    last_name, last = None, None
    for mod_name, mod in net.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = mod_name, mod
    if last is None:
        raise CompressError("model has no Linear classifier to resize")
    if last.out_features == num_classes:
        return
    parent = net.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else net
    new = nn.Linear(last.in_features, num_classes, bias=last.bias is not None)
    child = last_name.rpartition(".")[2]
    if isinstance(parent, nn.Sequential) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
