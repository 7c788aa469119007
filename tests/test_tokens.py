"""Token sparsification (DynamicViT): masked attention, the class token, static-shape inference, model.json."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models import VisionTransformer

from compress.deploy import DeployableModule
from compress.errors import CompressError
from compress.flops import count_flops
from compress.models import create_model
from compress.pruning.attention import split_attention
from compress.runs import build_spec, load, write_run
from compress.tokens import default_stages, keep_counts, returning_indices, sparsify, token_spec, tokens_per_block
from compress.tokens.attention import masked_attention, policy_attention
from compress.tokens.backbones import TorchvisionViT
from compress.tokens.losses import DynamicViTLoss, ratio_loss, token_distillation
from compress.tokens.model import dense_forward
from export.parity import index_agreement


def _tiny_vit(depth: int = 4, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    net = VisionTransformer(image_size=16, patch_size=4, num_layers=depth, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=5)
    nn.init.normal_(net.heads.head.weight, std=0.5)   # torchvision zero-initialises the head
    return net.eval()


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def _random_policy(b: int, n: int, seed: int, prefix: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    policy = (torch.rand(b, n, generator=g) < 0.5).float()
    policy[:, :prefix] = 1.0
    return policy


# ------------------------------------------------------------------ masked attention


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(2, 12), d=st.integers(1, 8), seed=st.integers(0, 999))
def test_masked_attention_equals_attention_over_kept_tokens_only(b, h, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) * 3 for _ in range(3))
    policy = _random_policy(b, n, seed)
    out = policy_attention(q, k, v, policy, d ** -0.5)
    for i in range(b):
        kept = policy[i].bool()
        qi, ki, vi = q[i][:, kept], k[i][:, kept], v[i][:, kept]
        alone = torch.softmax(qi @ ki.transpose(-2, -1) * d ** -0.5, -1) @ vi
        torch.testing.assert_close(out[i][:, kept], alone, rtol=1e-5, atol=1e-5)
        # a dropped query still gets a finite output (it may attend to itself and the kept tokens)
        assert torch.isfinite(out[i]).all()


def test_masked_attention_is_differentiable_in_the_policy():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 4, generator=g) for _ in range(3))
    policy = _random_policy(2, 6, 0).requires_grad_()
    policy_attention(q, k, v, policy, 0.5).sum().backward()
    assert policy.grad is not None and policy.grad.abs().sum() > 0


@pytest.mark.parametrize("split", [False, True], ids=["MultiheadAttention", "SplitAttention"])
def test_masked_block_on_kept_tokens_equals_the_block_on_the_gathered_tokens(split):
    net = _tiny_vit()
    if split:
        split_attention(net)
    adapter = TorchvisionViT()
    block = adapter.blocks(net)[1]
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(3))
    policy = _random_policy(2, 17, 5)
    with torch.no_grad():
        masked = adapter.masked_block(block, x, policy)
        torch.testing.assert_close(adapter.masked_block(block, x, torch.ones(2, 17)), block(x), rtol=1e-5, atol=1e-5)
        for i in range(2):
            kept = policy[i].bool()
            torch.testing.assert_close(masked[i, kept], block(x[i:i + 1, kept])[0], rtol=1e-5, atol=1e-5)


def test_timm_block_with_all_kept_equals_the_block():
    timm = pytest.importorskip("timm")
    from compress.tokens.backbones import TimmViT

    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=4,
                            embed_dim=32, depth=4, num_heads=2).eval()
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        torch.testing.assert_close(TimmViT().masked_block(net.blocks[0], x, torch.ones(2, 17)), net.blocks[0](x),
                                   rtol=1e-5, atol=1e-5)
        model = sparsify(net, 0.5).eval()
        assert model(_x()).shape == (3, 5)


def test_refuses_what_is_not_a_vit():
    with pytest.raises(CompressError, match="needs a vision transformer"):
        sparsify(create_model("resnet20", 10, 16), 0.7)
    with pytest.raises(CompressError, match="does not know the attention layer"):
        masked_attention(nn.Linear(4, 4), torch.zeros(1, 2, 4), torch.ones(1, 2))


# ------------------------------------------------------------------ schedule and the class token


def test_default_schedule_is_the_papers():
    assert default_stages(12) == [3, 6, 9] and default_stages(8) == [2, 4, 6] and default_stages(6) == [1, 3, 4]
    assert default_stages(2) == [0, 1]
    assert keep_counts(196, 0.7, 3) == [137, 96, 67]      # DeiT-S at 224 px: ⌊196·0.7^s⌋
    assert keep_counts(49, 0.7, 3) == [34, 24, 16]


def test_bad_schedules_are_refused():
    with pytest.raises(CompressError, match="--token-keep"):
        sparsify(_tiny_vit(), 1.0)
    with pytest.raises(CompressError, match="--token-stages"):
        sparsify(_tiny_vit(), 0.7, stages=[2, 1])
    with pytest.raises(CompressError, match="--token-stages"):
        sparsify(_tiny_vit(), 0.7, stages=[1, 4])


def _drop_everything(model) -> None:
    """Predictors that score every patch token as 'drop' with certainty."""
    with torch.no_grad():
        for p in model.predictors:
            p.score[-1].weight.zero_()
            p.score[-1].bias.copy_(torch.tensor([-50.0, 50.0]))


class _RecordPolicies:
    """Wraps an adapter, recording every policy handed to a masked block."""

    def __init__(self, adapter):
        self.inner, self.policies = adapter, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def masked_block(self, block, x, policy):
        self.policies.append(policy)
        return self.inner.masked_block(block, x, policy)


def test_class_token_is_never_dropped_in_masked_training():
    model = sparsify(_tiny_vit(), 0.5, stages=[1, 2]).train()
    model.sparse_training = True
    _drop_everything(model)
    model.adapter = _RecordPolicies(model.adapter)
    out = model(_x())
    assert all(d.sum() == 0 for d in out.decisions)              # every patch token dropped...
    assert model.adapter.policies and all(bool((p[:, 0] == 1).all()) for p in model.adapter.policies)   # ...not cls
    assert torch.isfinite(out.logits).all()


def test_class_token_is_never_dropped_at_inference():
    model = sparsify(_tiny_vit(), 0.5, stages=[1, 2]).eval()
    _drop_everything(model)
    blocks = model.adapter.blocks(model.backbone)
    before, after = {}, {}
    hooks = [blocks[0].register_forward_hook(lambda m, i, o: before.setdefault(1, o)),
             blocks[1].register_forward_pre_hook(lambda m, i: after.setdefault(1, i[0]))]
    with torch.no_grad():
        model.return_indices = True
        _logits, kept1, _kept2 = model(_x())
    for h in hooks:
        h.remove()
    assert after[1].shape[1] == 1 + model.keep[0]
    torch.testing.assert_close(after[1][:, 0], before[1][:, 0])          # position 0 is still the class token
    rows = before[1][:, 1:].gather(1, kept1.unsqueeze(-1).expand(-1, -1, 32))
    torch.testing.assert_close(after[1][:, 1:], rows)                   # the rest are the kept patch tokens
    assert bool((kept1.diff(dim=1) > 0).all())                          # in spatial order, no repeats


# ------------------------------------------------------------------ inference module: static shapes, FLOPs, model.json


def test_gather_path_has_static_token_counts_and_fvcore_counts_them():
    net = _tiny_vit(depth=4)
    dense = count_flops(net, (3, 16, 16))
    model = sparsify(net, 0.5).eval()                    # stages [1, 2, 3] keep 8, 4, 2 of 16 patches
    assert tokens_per_block(model) == [17, 9, 5, 3]
    blocks = model.adapter.blocks(net)
    per_block = sum(count_flops(b, (n, 32)) for b, n in zip(blocks, tokens_per_block(model), strict=True))
    dense_blocks = sum(count_flops(b, (17, 32)) for b in blocks)
    predictors = sum(count_flops(p, (n, 32)) for p, n in zip(model.predictors, [16, 8, 4], strict=True))
    final_norm = count_flops(net.encoder.ln, (3, 32)) - count_flops(net.encoder.ln, (17, 32))
    assert count_flops(model, (3, 16, 16)) == dense - dense_blocks + per_block + predictors + final_norm


def test_model_json_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = sparsify(create_model("vit_tiny_p4_d6", 5, 16), 0.7)
    with torch.no_grad():
        for w in [*model.predictors.parameters(), model.backbone.heads.head.weight]:
            w.normal_()                                     # distinct, non-trivial weights
    module = DeployableModule(model, [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16)).eval()
    spec = build_spec("vit_tiny_p4_d6", 5, (3, 16, 16), [0.5] * 3, [0.25] * 3, adapt=None, data="synthetic")
    spec["tokens"] = token_spec(model, 0.7)
    assert spec["tokens"]["stages"] == [1, 3, 4] and spec["tokens"]["keep"] == [11, 7, 5]
    run = write_run(tmp_path / "run", module, spec, {"command": "prune"})
    x = _x(4)
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(load(run)(x), expected)
    torch.save(x, tmp_path / "x.pt")
    code = (f"import torch, compress; m = compress.load({str(run)!r}); x = torch.load({str(tmp_path / 'x.pt')!r}); "
            f"torch.save(m(x).detach(), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch.equal(torch.load(tmp_path / "y.pt"), expected)


def test_deepcopy_keeps_the_schedule():
    model = sparsify(_tiny_vit(), 0.5)
    twin = copy.deepcopy(model)
    assert twin.keep == model.keep and twin.stages == model.stages


# ------------------------------------------------------------------ losses


def test_ratio_loss_pulls_the_kept_share_to_the_target():
    """Predictors alone (backbone frozen) trained on the ratio loss move every stage's kept share from the
    untrained ~0.5^s to ρ^s."""
    model = sparsify(_tiny_vit(depth=3), 0.7, stages=[0, 1, 2]).train()
    model.sparse_training = True
    model.generator = torch.Generator().manual_seed(0)
    targets = [0.7, 0.49, 0.343]
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.predictors.parameters(), lr=2e-2)
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def shares() -> list[float]:
        with torch.no_grad():
            runs = [model(x).decisions for _ in range(4)]
            return [float(torch.stack([r[s].mean() for r in runs]).mean()) for s in range(3)]

    before = shares()
    assert abs(before[0] - 0.7) > 0.1 and abs(before[2] - 0.343) > 0.1
    for _ in range(80):
        loss = ratio_loss(model(x).decisions, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = shares()
    assert all(abs(a - t) < 0.04 for a, t in zip(after, targets, strict=True)), (before, after)


def test_losses_combine_and_token_loss_reads_kept_tokens_only():
    student, teacher = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    teacher[0, 1] = 10.0                                     # a difference only at a dropped token…
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert token_distillation(student, teacher, mask) == 0   # …is not penalised
    teacher[1, 1] = 2.0
    assert token_distillation(student, teacher, mask) > 0
    assert token_distillation(student, teacher, torch.zeros(2, 4)) == 0
    model = sparsify(_tiny_vit(), 0.7).train()
    model.sparse_training = True
    out = model(_x())
    t_logits, t_tokens = dense_forward(model.backbone, _x())
    loss, parts = DynamicViTLoss([0.7, 0.49, 0.343])(out, torch.tensor([0, 1, 2]), t_logits, t_tokens)
    expected = parts["ce"] + 2.0 * parts["ratio"] + 0.5 * (parts["kl"] + parts["token_mse"])
    assert loss.item() == pytest.approx(expected, rel=1e-5) and {"keep1", "keep2", "keep3"} <= set(parts)


# ------------------------------------------------------------------ export


def test_onnx_export_checks_logits_and_kept_indices(tmp_path):
    from export.onnx import OnnxRunner, to_onnx

    model = sparsify(_tiny_vit(depth=3), 0.6)
    with torch.no_grad():
        for w in model.predictors.parameters():
            w.normal_()
    module = DeployableModule(model, [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16)).eval()
    result = to_onnx(module, tmp_path / "m.onnx", dynamic_batch=True, simplify=False, exporter="dynamo")
    assert result.output_names == ["logits", "kept_tokens_1", "kept_tokens_2", "kept_tokens_3"]
    assert result.output_shapes[1:] == [["batch", 9], ["batch", 5], ["batch", 3]]
    assert result.parity.passed and result.parity.indices_agreement == 1.0 and result.parity.top1_agreement == 1.0
    logits, *kept = OnnxRunner(tmp_path / "m.onnx").outputs(_x(5).numpy())
    with torch.no_grad(), returning_indices(module):
        ref = module(_x(5))
    assert all((k == r.numpy()).all() for k, r in zip(kept, ref[1:], strict=True))
    assert not model.return_indices                            # export left the module as it was


def test_index_agreement_counts_disagreeing_samples():
    a = [np.array([[0, 1], [2, 3], [1, 3]]), np.array([[1], [2], [3]])]
    b = [np.array([[0, 1], [2, 4], [1, 3]]), np.array([[1], [2], [0]])]
    batches = [(np.zeros((3, 1)), 3)]
    assert index_agreement(lambda x: a, lambda x: a, batches) == 1.0
    assert index_agreement(lambda x: a, lambda x: b, batches) == pytest.approx(1 / 3)
    assert index_agreement(lambda x: a, lambda x: b, [(np.zeros((3, 1)), 1)]) == 1.0   # padding rows ignored


def test_kept_patch_picture_matches_the_kept_indices(tmp_path):
    from compress.tokens.figure import kept_pixel_masks, plot_kept_patches

    model = sparsify(_tiny_vit(), 0.5, stages=[1, 2])
    module = DeployableModule(model, [0.5] * 3, [0.25] * 3, input_size=(3, 16, 16)).eval()
    masks = kept_pixel_masks(module, _x(2))
    with torch.no_grad(), returning_indices(module):
        _logits, kept1, _kept2 = module(_x(2))
    assert [m.shape for m in masks] == [(2, 16, 16)] * 2
    assert [int(m[0].sum()) for m in masks] == [8 * 16, 4 * 16]           # kept patches × 4×4 px
    row, col = divmod(int(kept1[0, 0]), 4)
    assert bool(masks[0][0, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4].all())
    assert bool((masks[1] <= masks[0]).all())                               # a dropped patch stays dropped
    out = plot_kept_patches(module, _x(2), tmp_path / "kept.png", titles=["a", "b"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the training stage (shared loop)


def _dense_and_token_sparse() -> tuple:
    """Synthetic data, a dense 3-block ViT (deployable) and a token-sparse copy of it at ρ 0.7."""
    from compress.data import load_data

    bundle = load_data("synthetic:80", image_size=16)
    net = VisionTransformer(image_size=16, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64,
                            num_classes=10)
    dense = DeployableModule(net, bundle.mean, bundle.std, input_size=(3, 16, 16))
    module = copy.deepcopy(dense)
    module.net = sparsify(module.net, 0.7)
    return bundle, dense, module


def test_dynamicvit_stage_trains_predictors_then_the_backbone_as_the_paper():
    from compress.loop import run_stage
    from compress.tokens.training import DynamicViTStage, TokenOptions

    bundle, dense, module = _dense_and_token_sparse()
    start = copy.deepcopy(module.state_dict())
    options = TokenOptions(epochs=2, freeze_epochs=1, lr=1e-2)

    def changed(state, prefix):
        return {k for k, v in module.state_dict().items() if k.startswith(prefix) and not torch.equal(v, state[k])}

    one = DynamicViTStage(dense, TokenOptions(epochs=1, freeze_epochs=1, lr=1e-2), seed=0)
    record = run_stage(module, bundle, one, batch_size=32, seed=0)
    assert changed(start, "net.predictors") and not changed(start, "net.backbone")      # backbone frozen at first
    assert {"keep1", "keep2", "keep3", "ratio", "kl", "token_mse"} <= set(record.history[0])
    assert not module.net.sparse_training and not module.training                     # deployable again
    module.load_state_dict(start)
    stage = DynamicViTStage(dense, options, seed=0)
    run_stage(module, bundle, stage, batch_size=32, seed=0)
    moved = changed(start, "net.backbone")
    assert moved and not any(k.endswith(("class_token", "pos_embedding")) for k in moved)
    assert stage._backbone.param_groups[0]["lr"] == pytest.approx(1e-4)                 # 1/100 of the predictors'


def test_token_fine_tuning_trains_the_backbone_on_the_top_k_tokens_with_the_predictors_frozen():
    from compress.tokens.training import TokenOptions, train_tokens

    bundle, dense, module = _dense_and_token_sparse()
    start = copy.deepcopy(module.state_dict())
    gathered = []
    module.net.register_forward_hook(lambda m, i, o: gathered.append(m.training and not m.sparse_training))
    record = train_tokens(module, dense, bundle, TokenOptions(epochs=0, finetune_epochs=1), seed=0, batch_size=32,
                          lr=0.05)
    moved = {k for k, v in module.state_dict().items() if not torch.equal(v, start[k])}
    assert moved and all(k.startswith("net.backbone") for k in moved)          # the predictors did not move
    assert any(gathered)                                  # it trained through the top-k (gather) path
    assert len(record["fine-tune"]["history"]) == 1 and all(p.requires_grad for p in module.parameters())
