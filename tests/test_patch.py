"""EViT on timm models: equivalence at keep 1.0, per-sample keep rates, token bookkeeping, errors."""

import math

import pytest
import timm
import torch
from _tiny import ARCHS, TINY, images, tiny_pair

import evit
from evit.patch import default_prune_blocks


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_keep_rate_one_equals_timm(kind):
    ref, model = tiny_pair(kind)
    x = images(4)
    with torch.inference_mode():
        expected = ref(x)
        assert torch.allclose(model(x, keep_rate=1.0), expected, atol=1e-5)
        assert torch.allclose(model(x), expected, atol=1e-5)  # default keep rate is 1.0
        assert not torch.allclose(model(x, keep_rate=0.5), expected, atol=1e-3)  # pruning does change things


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_mixed_rates_equal_solo_runs(kind):
    _, model = tiny_pair(kind)
    x = images(6)
    rates = [0.5, 1.0, 0.7, 0.5, 0.25, 0.9]
    with torch.inference_mode():
        mixed = model.forward_with_info(x, keep_rate=torch.tensor(rates), return_kept=True)
        for i, r in enumerate(rates):
            solo = model.forward_with_info(x[i : i + 1], keep_rate=r, return_kept=True)
            assert torch.allclose(mixed.logits[i], solo.logits[0], atol=1e-4), (i, r)
            assert mixed.tokens[i] == solo.tokens[0] == model.cost(r).total_tokens
            assert all(torch.equal(m[i], s[0]) for m, s in zip(mixed.kept, solo.kept, strict=True))


def test_token_counts_per_stage():
    _, model = tiny_pair("vit", prune_blocks=(1, 2, 3))
    x = images(2)
    with torch.inference_mode():
        out = model.forward_with_info(x, keep_rate=0.5, return_kept=True)
    # 16 patches -> keep 8 (+1 fused) -> keep ceil(4.5)=5 (+1) -> keep 3 (+1); one class token
    assert model.cost(0.5).tokens == (17, 17, 10, 7)
    assert out.tokens.tolist() == [17 + 17 + 10 + 7] * 2
    kept_patches = [k.sum(1).tolist() for k in out.kept]
    assert kept_patches[0] == [8, 8]
    assert all(a >= b for a, b in zip(kept_patches[0], kept_patches[1], strict=True))
    # a patch kept at a later stage was kept at every earlier stage
    assert torch.all(out.kept[0] | ~out.kept[1]) and torch.all(out.kept[1] | ~out.kept[2])


def test_drop_instead_of_fuse():
    _, fused = tiny_pair("vit", fuse=True)
    _, dropped = tiny_pair("vit", fuse=False)
    assert fused.cost(0.5).tokens == (17, 17, 10, 7) and dropped.cost(0.5).tokens == (17, 17, 9, 5)
    x = images(2)
    with torch.inference_mode():
        assert dropped.forward_with_info(x, 0.5).tokens.tolist() == [17 + 17 + 9 + 5] * 2
        assert not torch.allclose(fused(x, 0.5), dropped(x, 0.5))


def test_fused_and_explicit_attention_agree():
    _, model = tiny_pair("layerscale_qknorm")
    x = images(3)
    rates = torch.tensor([0.3, 0.6, 1.0])
    with torch.inference_mode():
        fused = model(x, rates)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(model(x, rates), fused, atol=1e-5)


def test_autocast_and_gradients():
    _, model = tiny_pair("vit")
    x = images(4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.5, 0.7, 1.0, 0.5]))
    assert out.shape == (4, 10) and torch.isfinite(out.float()).all()
    model.train()
    loss = model(x, keep_rate=0.5).logsumexp(-1).mean()
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None and model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_training_with_stochastic_depth_runs_per_sample():
    torch.manual_seed(0)
    model = evit.create_model("vit_tiny_patch16_224", **TINY, drop_path_rate=0.5).train()
    out = model(images(4), torch.tensor([0.5, 1.0, 0.5, 0.7]))
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_default_prune_blocks():
    assert default_prune_blocks(12) == (3, 6, 9)  # the paper's blocks 4, 7, 10 (1-based)
    assert default_prune_blocks(24) == (6, 12, 18)
    assert default_prune_blocks(4) == (1, 2, 3)
    assert evit.create_model("vit_tiny_patch16_224", **TINY).evit_cfg.prune_blocks == (1, 2, 3)


@pytest.mark.parametrize(
    ("keep_rate", "message"),
    [
        (0.0, "in \\(0, 1\\]"),
        (-0.5, "in \\(0, 1\\]"),
        (1.5, "in \\(0, 1\\]"),
        (math.nan, "in \\(0, 1\\]"),
        (torch.tensor([0.5, math.nan]), "in \\(0, 1\\]"),
        (torch.tensor([0.5, 0.7, 0.9]), "one rate per sample"),
        (torch.tensor([[0.5, 0.7]]), "one rate per sample"),
    ],
)
def test_bad_keep_rates_raise(keep_rate, message):
    _, model = tiny_pair("vit")
    with pytest.raises(ValueError, match=message):
        model(images(2), keep_rate=keep_rate)


def test_model_without_class_token_is_refused():
    with pytest.raises(ValueError, match="no class token"):
        evit.create_model("vit_tiny_patch16_224", **TINY, class_token=False, global_pool="avg")


def test_bad_prune_blocks_are_refused():
    with pytest.raises(ValueError, match="0-based block indices"):
        evit.create_model("vit_tiny_patch16_224", **TINY, prune_blocks=(4,))


def test_incompatible_block_layout_is_refused():
    model = timm.create_model("vit_tiny_patch16_224", **TINY)
    del model.blocks[0].ls1
    with pytest.raises(ValueError, match="Block/Attention layout"):
        evit.apply_patch(model)


def test_patch_keeps_timm_identity():
    ref, model = tiny_pair("deit_distilled")
    assert isinstance(model, type(ref)) and model.state_dict().keys() == ref.state_dict().keys()
    assert evit.data_config(model)["input_size"] == (3, 32, 32)
    assert evit.data_config(model)["mean"] == timm.data.resolve_model_data_config(ref)["mean"]
    evit.apply_patch(model, prune_blocks=(2,))  # re-patching replaces the configuration
    assert model.evit_cfg.prune_blocks == (2,) and type(model).__mro__[1] is evit.patch.EViTMixin


@pytest.mark.parametrize("kind", ["vit", "registers"])
def test_forward_features_prunes_like_forward(kind):
    ref, model = tiny_pair(kind, keep_rate=0.5)
    x = images(3)
    P = model.num_prefix_tokens
    with torch.inference_mode():
        feats = model.forward_features(x)  # the model's default keep rate: 0.5
        assert feats.shape[0] == 3 and feats.shape[1] < P + model.num_patches  # pruned, not timm's unpruned tokens
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=1e-4, atol=1e-5)
        mixed = model.forward_features(x, keep_rate=[0.25, 0.25, 0.25])
        torch.testing.assert_close(model.forward_head(mixed), model(x, keep_rate=0.25), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.forward_features(x, keep_rate=1.0), ref.forward_features(x),
                                   rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="forward_with_info"):  # different token counts: no one tensor
            model.forward_features(x, keep_rate=[0.25, 1.0, 0.5])


def test_forward_features_keeps_batch_order_when_rates_keep_equal_counts():
    _, model = tiny_pair(keep_rate=1.0)
    x = images(2)
    with torch.inference_mode():  # 16 patches: 0.5 and 0.49 both keep 8 at every stage
        assert model.cost(0.49).tokens == model.cost(0.5).tokens
        feats = model.forward_features(x, keep_rate=[0.5, 0.49])
        torch.testing.assert_close(feats[0], model.forward_features(x[:1], keep_rate=0.5)[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(feats[1], model.forward_features(x[1:], keep_rate=0.49)[0], rtol=1e-4, atol=1e-5)


def test_forward_intermediates_refuses_to_run_unpruned():
    ref, model = tiny_pair(keep_rate=0.7)
    x = images(2)
    with torch.inference_mode():
        with pytest.raises(NotImplementedError, match=r"keep rate 0\.7 prunes"):
            model.forward_intermediates(x)  # the default keep rate prunes: never silently unpruned
        with pytest.raises(NotImplementedError, match=r"keep rate 0\.5 prunes"):
            model.forward_intermediates(x, keep_rate=[1.0, 0.5])
        got = model.forward_intermediates(x, keep_rate=1.0, indices=2)
        expected = ref.forward_intermediates(x, indices=2)
        torch.testing.assert_close(got[0], expected[0])
        for a, b in zip(got[1], expected[1], strict=True):
            torch.testing.assert_close(a, b)
