"""Weights: local checkpoints in every supported form, strict keys, clear errors offline."""

import dataclasses

import pytest
import timm
import torch
from _tiny import TINY, images
from safetensors.torch import save_file

import evit
from evit.loading import load_checkpoint, read_state_dict


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


def logits(model):
    with torch.inference_mode():
        return model.eval()(images(2))


@pytest.mark.parametrize("form", ["safetensors", "pth", "nested_model", "ddp_prefix", "training_ckpt"])
def test_checkpoint_forms_load_exactly(tmp_path, reference, form):
    state = reference.state_dict()
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        path = tmp_path / "w.pth"
        obj = {
            "pth": state,
            "nested_model": {"model": state},  # official EViT / DeiT checkpoints
            "ddp_prefix": {f"module.{k}": v for k, v in state.items()},
            "training_ckpt": {"state_dict": state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
        }[form]
        torch.save(obj, path)
    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=path, **TINY)
    assert torch.equal(logits(model), logits(reference))


def test_missing_and_unexpected_keys_are_reported(tmp_path, reference):
    state = dict(reference.state_dict())
    state.pop("blocks.0.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(evit.WeightsError, match=r"missing keys \['blocks.0.attn.qkv.weight'\].*extra.weight"):
        evit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "bad.pth", **TINY)


def test_wrong_architecture_is_reported(tmp_path, reference):
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    with pytest.raises(evit.WeightsError, match="does not"):
        evit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", **{**TINY, "embed_dim": 64})


def test_unreadable_and_absent_files(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(evit.WeightsError, match="could not read"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(evit.WeightsError, match="not found"):
        read_state_dict(tmp_path / "absent.safetensors")
    torch.save({"epoch": 1}, tmp_path / "nostate.pth")
    with pytest.raises(evit.WeightsError, match="no state dict"):
        read_state_dict(tmp_path / "nostate.pth")


def test_hub_weights_offline_give_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine with no network
    with pytest.raises(evit.WeightsError, match="--checkpoint"):
        evit.create_model("vit_tiny_patch16_224", pretrained=True, **TINY)


@dataclasses.dataclass
class Note:
    text: str


@pytest.fixture(scope="module")
def other():
    """A second set of weights for the same architecture (the 'EMA' of a training checkpoint)."""
    torch.manual_seed(4)
    return timm.create_model("vit_tiny_patch16_224", **TINY).eval()


@pytest.mark.parametrize("ema_key", ["state_dict_ema", "model_ema"])
def test_ema_weights_chosen_as_timm_does(tmp_path, reference, other, ema_key):
    """timm.create_model(checkpoint_path=...) loads the EMA weights; use_ema=False the raw ones."""
    raw_key = "state_dict" if ema_key == "state_dict_ema" else "model"
    ema = {f"module.{k}": v for k, v in other.state_dict().items()}  # DDP-wrapped EMA, as timm's train.py saves
    torch.save({raw_key: reference.state_dict(), ema_key: ema, "epoch": 9}, tmp_path / "ckpt.pth")
    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "ckpt.pth", **TINY)
    assert torch.equal(logits(model), logits(other))
    plain = timm.create_model("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "ckpt.pth"), **TINY)
    assert torch.equal(logits(plain), logits(other))  # the same choice as timm's own loader
    raw = timm.create_model("vit_tiny_patch16_224", **TINY)
    load_checkpoint(raw, tmp_path / "ckpt.pth", use_ema=False)
    assert torch.equal(logits(raw), logits(reference))


def test_compiled_and_wrapped_prefixes(tmp_path, reference):
    state = {f"_orig_mod.module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", **TINY)
    assert torch.equal(logits(model), logits(reference))


def test_weights_only_refuses_pickled_objects(tmp_path, reference):
    """An arbitrary pickled object is refused with weights_only (the default) and read when it is off."""
    torch.save({"state_dict": reference.state_dict(), "note": Note("trained")}, tmp_path / "obj.pth")
    with pytest.raises(evit.WeightsError, match="could not read"):
        read_state_dict(tmp_path / "obj.pth")
    assert set(read_state_dict(tmp_path / "obj.pth", weights_only=False)) == set(reference.state_dict())
