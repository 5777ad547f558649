"""Training-free options: their math on small hand-checked tensors, and the guarantees every option keeps
(keep 1.0 equals timm, mixed-rate batches equal solo runs, the cost model equals FlopCounterMode)."""

import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import TINY, images, tiny_pair
from test_cost import counted_gmacs

import evit
from evit.merge import merge_nearest
from evit.reorganize import ReorgOptions, Side, class_attention, fuse_weights, reorganize, size_bias

X = torch.tensor([[[100.0], [1.0], [2.0], [3.0], [4.0]]])  # B=1, one prefix token, 4 tokens, C=1
ATTN = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # class attention to the 4 tokens: keep tokens 2 and 4


def test_mean_fusion_by_hand():
    w = fuse_weights(ATTN, torch.tensor([[1, 3]]), normalize=True)
    assert w[0].tolist() == pytest.approx([1 / 3, 0.0, 2 / 3, 0.0])
    (out,), _ = reorganize(ATTN, [(0, 1, 2)], ReorgOptions("one", normalize=True))(X)
    assert out[0, :, 0].tolist() == pytest.approx([100.0, 2.0, 4.0, (0.1 * 1 + 0.2 * 3) / 0.3])


def test_sizes_and_scores_follow_the_tokens():
    side = Side(ids=torch.tensor([[0, 1, 2, -1]]), sizes=torch.tensor([[1.0, 2.0, 1.0, 5.0]]),
                scores=torch.tensor([[0.5, 0.1, 0.9, 0.2]]))
    # rank by the accumulated scores (keep tokens 3 and 1), fuse with this block's attention
    (out,), (new,) = reorganize(ATTN, [(0, 1, 2)], ReorgOptions("one"), side.scores)(X, side)
    assert out[0, :, 0].tolist() == pytest.approx([100.0, 3.0, 1.0, 0.4 * 2 + 0.3 * 4])
    assert new.ids.tolist() == [[2, 0, -1]]
    assert new.sizes.tolist() == [[1.0, 1.0, 2.0 + 5.0]]  # the fused token stands for every patch it took in
    assert new.scores[0].tolist() == pytest.approx([0.9, 0.5, 0.1 + 0.2])
    _, (dropped,) = reorganize(ATTN, [(0, 1, 2)], ReorgOptions("drop"), side.scores)(X, side)
    assert dropped.sizes.tolist() == [[1.0, 1.0]] and dropped.ids.tolist() == [[2, 0]]


def test_nearest_fusion_by_hand():
    """Each token not kept joins its most similar kept token (cosine), as a size-weighted mean."""
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.3], [0.2, 1.0], [4.0, 0.0]]])  # b=1, n=5, C=2
    sizes = torch.tensor([[1.0, 2.0, 1.0, 3.0, 1.0]])
    keep, rest = torch.tensor([[0, 1]]), torch.tensor([[2, 3, 4]])
    merged, dst = merge_nearest(tokens, sizes, keep, rest)
    assert dst.tolist() == [[0, 1, 0]]  # (3, .3) and (4, 0) point along token 0; (.2, 1) along token 1
    expected = torch.tensor([[(1 + 3 + 4) / 3, 0.3 / 3], [(0 + 0.2 * 3) / 5, (2 * 2 + 3) / 5]])
    assert torch.allclose(merged[0], expected)
    # through reorganize: rank by class attention, keep 2 of 4, sizes and scores follow their hosts
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.1], [0.1, 3.0]]])  # prefix token first
    side = Side(ids=torch.tensor([[0, 1, 2, 3]]), sizes=torch.tensor([[1.0, 1.0, 2.0, 1.0]]),
                scores=torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    (out,), (new,) = reorganize(torch.tensor([[0.4, 0.3, 0.2, 0.1]]), [(0, 1, 2)], ReorgOptions("nearest"))(x, side)
    assert torch.allclose(out[0], torch.tensor([[9.0, 9.0], [(1 + 2 * 2) / 3, 0.2 / 3], [0.05, 2.0]]))
    assert new.ids.tolist() == [[0, 1]] and new.sizes.tolist() == [[3.0, 2.0]]
    assert new.scores[0].tolist() == pytest.approx([0.6, 0.4])


def test_nearest_merge_in_half_precision_and_its_guards():
    # large tokens of large size: float16 sums would overflow (300 * 60 * 5 > 65504); the merge runs in float32
    tokens = torch.full((1, 6, 4), 300.0, dtype=torch.float16)
    sizes = torch.full((1, 6), 60.0)
    merged, _ = merge_nearest(tokens, sizes, torch.tensor([[0]]), torch.tensor([[1, 2, 3, 4, 5]]))
    assert merged.dtype == torch.float16 and torch.equal(merged, torch.full((1, 1, 4), 300.0, dtype=torch.float16))
    # reorganize gives tokens their sizes when the caller has none, so a merged token remembers them
    x = torch.tensor([[[9.0], [1.0], [2.0], [3.0], [4.0]]])
    _, (side,) = reorganize(ATTN, [(0, 1, 2)], ReorgOptions("nearest"))(x)
    assert side.sizes.sum().item() == 4.0 and side.sizes.shape == (1, 2)
    with pytest.raises(ValueError, match="fusion must be one of"):
        ReorgOptions(True)  # type: ignore[arg-type]  # the old boolean is refused, not read as "drop"
    with pytest.raises(ValueError, match="merged"):
        Side(ids=torch.tensor([[0, 1, 2, 3]])).select(torch.tensor([[0, 1]]), "nearest")


def test_size_bias_and_proportional_class_attention():
    assert size_bias(None, 1) is None
    bias = size_bias(torch.tensor([[1.0, 2.0, 4.0]]), num_prefix_tokens=1)
    assert bias.shape == (1, 1, 1, 4) and bias.flatten().tolist() == pytest.approx([0, 0, math.log(2), math.log(4)])
    # identical keys: attention is proportional to the patches each token stands for
    q, k = torch.zeros(1, 2, 4, 3), torch.ones(1, 2, 4, 3)
    assert class_attention(q, k, 0.5, bias)[0].tolist() == pytest.approx([1 / 8, 1 / 8, 2 / 8, 4 / 8])


def test_proportional_attention_equals_the_duplicated_tokens():
    """A token of size s attends and is attended like s identical copies of it (ToMe's property)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)  # B=1, H=2, N=4, D=8
    sizes = torch.tensor([[1.0, 3.0, 2.0]])  # tokens 1..3 stand for 1, 3, 2 patches; token 0 is the prefix
    reps = torch.tensor([1, 1, 3, 2])
    dup_k, dup_v = k.repeat_interleave(reps, dim=2), v.repeat_interleave(reps, dim=2)
    expected = F.scaled_dot_product_attention(q, dup_k, dup_v)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=size_bias(sizes, 1))
    assert torch.allclose(got, expected, atol=1e-6)
    dup = class_attention(q, dup_k, 8**-0.5)[0]  # the class row over the 7 duplicated keys
    summed = torch.stack([dup[0], dup[1], dup[2:5].sum(), dup[5:7].sum()])
    assert torch.allclose(class_attention(q, k, 8**-0.5, size_bias(sizes, 1))[0], summed, atol=1e-6)


OPTIONS = {
    "mean": dict(fuse_weight="mean"),
    "size_attn": dict(fuse_weight="mean", size_attn=True),
    "size_attn_sum": dict(size_attn=True),
    "cumulative": dict(ranking="cumulative"),
    "every": dict(schedule="every"),
    "accurate": dict(evit.ACCURATE),
    "every_cumulative_size": dict(schedule="every", ranking="cumulative", size_attn=True, fuse_weight="mean"),
    "drop_size": dict(fuse=False, size_attn=True, ranking="cumulative"),
    "nearest": dict(fuse_into="nearest"),
    "nearest_cumulative": dict(fuse_into="nearest", ranking="cumulative", schedule="every"),
}


def pair(kind: str = "vit", **options):
    """(plain timm, EViT with ``options``) tiny 8-block models: paper blocks (2, 4, 6), "every" 1..7."""
    ref, model = tiny_pair(kind, depth=8)
    return ref, evit.apply_patch(model, **options)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("kind", ["vit", "registers"])
def test_option_keeps_the_guarantees(name, kind):
    ref, model = pair(kind, **OPTIONS[name])
    x = images(5)
    rates = [0.5, 1.0, 0.7, 0.3, 0.5]
    with torch.inference_mode():
        assert torch.allclose(model(x, keep_rate=1.0), ref(x), atol=1e-5)
        mixed = model.forward_with_info(x, keep_rate=torch.tensor(rates), return_kept=True)
        assert len(mixed.kept) == len(model.evit_cfg.prune_blocks)
        for i, r in enumerate(rates):
            solo = model.forward_with_info(x[i : i + 1], keep_rate=r, return_kept=True)
            assert torch.allclose(mixed.logits[i], solo.logits[0], atol=1e-4), (i, r)
            assert mixed.tokens[i] == solo.tokens[0] == model.cost(r).total_tokens
            assert all(torch.equal(m[i], s[0]) for m, s in zip(mixed.kept, solo.kept, strict=True))
        _, paper = pair(kind)
        assert not torch.allclose(model(x, keep_rate=0.5), paper(x, keep_rate=0.5), atol=1e-4)  # it does something


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("keep_rate", [0.9, 0.5, 0.2])
def test_option_cost_matches_flop_counter(name, keep_rate):
    _, model = pair("vit", **OPTIONS[name])
    assert model.cost(keep_rate).gmacs == pytest.approx(counted_gmacs(model, images(2), keep_rate), rel=1e-9)


def test_size_attn_fused_and_explicit_attention_agree():
    _, model = pair("layerscale_qknorm", size_attn=True, fuse_weight="mean")
    x, rates = images(3), torch.tensor([0.3, 0.6, 1.0])
    with torch.inference_mode():
        fused = model(x, rates)
        for blk in model.blocks:
            blk.attn.fused_attn = False
        assert torch.allclose(model(x, rates), fused, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [dict(schedule="every", fuse_weight="mean", size_attn=True, ranking="cumulative"), evit.ACCURATE],
    ids=["every_mean_size_cumulative", "accurate"],
)
def test_all_options_under_autocast_and_training(options):
    _, model = pair("vit", **options)
    x = images(4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.tensor([0.5, 0.7, 1.0, 0.3]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    model.train()
    model(x, keep_rate=0.5).logsumexp(-1).mean().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(fuse_weight="median"), "fuse_weight"),
        (dict(ranking="global"), "ranking"),
        (dict(fuse_into="all"), "fuse_into"),
        (dict(schedule="fastest"), "unknown schedule"),
        (dict(schedule=evit.Schedule(weights=(1.0, 2.0))), "one non-negative number per pruning block"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        pair("vit", **options)


def test_evit_eval_takes_the_options(tmp_path):
    from test_eval import run_eval, tiny_checkpoint, write_images

    write_images(tmp_path / "data" / "a", 3)
    write_images(tmp_path / "data" / "b", 3, seed=1)
    args = ["--keep-rates", "1.0,0.5", "--schedule", "every", "--fuse-weight", "mean", "--ranking", "cumulative"]
    out = run_eval(tmp_path, tiny_checkpoint(tmp_path, rigged=False), tmp_path / "data", *args)
    assert out["options"] == {"schedule": "every", "fuse_weight": "mean", "fuse_into": "one", "size_attn": False,
                              "ranking": "cumulative"}
    model = evit.create_model("vit_tiny_patch16_224", **TINY, **out["options"])
    assert [r["gmacs"] for r in out["rows"]] == [model.cost(1.0).gmacs, model.cost(0.5).gmacs]
    assert out["prune_blocks"] == [1, 2, 3]


def test_option_flags_of_the_tools():
    from evit.tools import cli, eval, finetune, viz

    required = ["--model", "m", "--pretrained", "--images", "i", "--train", "t", "--image", "i"]
    for tool in (eval, finetune, viz):
        def parse(*flags, parser=tool.build_parser):
            return parser().parse_known_args([*required, *flags])[0]

        assert cli.options(parse()) == cli.DEFAULT_OPTIONS
        assert cli.options(parse("--accurate")) == {**cli.DEFAULT_OPTIONS, **evit.ACCURATE}
        assert cli.options(parse("--accurate", "--schedule", "every", "--ranking", "cumulative")) == {
            **cli.DEFAULT_OPTIONS, **evit.ACCURATE, "schedule": "every", "ranking": "cumulative"}
        assert cli.options(parse("--no-size-attn", "--accurate"))["size_attn"] is False  # order does not matter
    _, model = pair("vit", **cli.DEFAULT_OPTIONS)  # the defaults are create_model's: the paper's rule
    assert model.evit_cfg == pair("vit")[1].evit_cfg
