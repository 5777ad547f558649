"""Settings from the environment and flags; model loading errors that name the setting to fix them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import evit
from service.__main__ import main
from service.flags import parse_settings
from service.metrics import rate_label
from service.registry import ModelLoadError, load_registry
from service.settings import ASSET_CHECKPOINT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EVIT_"):
            monkeypatch.delenv(key)


def test_defaults_and_flags_override_env(monkeypatch) -> None:
    s = parse_settings([])
    (spec,) = s.model_specs()
    assert (spec.name, spec.arch, spec.weights, s.device) == ("deit_small_patch16_224",) * 2 + ("hub", "auto")
    monkeypatch.setenv("EVIT_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("EVIT_MAX_WAIT_MS", "7.5")
    monkeypatch.setenv("EVIT_MODEL", "vit_tiny_patch16_224")
    monkeypatch.setenv("EVIT_CHECKPOINT", "/w/tiny.safetensors")
    s = parse_settings(["--max-batch-size", "4"])
    assert (s.max_batch_size, s.max_wait_ms) == (4, 7.5)
    (spec,) = s.model_specs()
    assert (spec.arch, spec.weights) == ("vit_tiny_patch16_224", "/w/tiny.safetensors")


def test_several_models_and_full_specs(monkeypatch) -> None:
    s = parse_settings(["--model", "small=deit_small_patch16_224", "--model", "vit_tiny_patch16_224",
                        "--random-weights", "--prune-blocks", "2,5,8", "--keep-rate", "0.7"])
    specs = s.model_specs()
    assert [(m.name, m.arch, m.weights, m.prune_blocks, m.keep_rate) for m in specs] == [
        ("small", "deit_small_patch16_224", "random", (2, 5, 8), 0.7),
        ("vit_tiny_patch16_224", "vit_tiny_patch16_224", "random", (2, 5, 8), 0.7),
    ]
    monkeypatch.setenv("EVIT_MODELS", json.dumps([{"name": "t", "arch": "vit_tiny_patch16_224", "weights": "random",
                                                   "model_kwargs": {"img_size": 32}}]))
    (spec,) = parse_settings(["--port", "9000"]).model_specs()
    assert (spec.name, spec.model_kwargs) == ("t", {"img_size": 32})
    (spec,) = parse_settings(["--model", "vit_tiny_patch16_224"]).model_specs()  # flat flags replace EVIT_MODELS
    assert spec.name == "vit_tiny_patch16_224"


def test_accurate_options_reach_the_model(monkeypatch) -> None:
    tiny = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}
    monkeypatch.setenv("EVIT_OPTIONS", "accurate")
    monkeypatch.setenv("EVIT_MODELS", json.dumps([
        {"name": "a", "arch": "vit_tiny_patch16_224", "weights": "random", "options": "accurate", "model_kwargs": tiny},
        {"name": "b", "arch": "vit_tiny_patch16_224", "weights": "random", "options": "accurate",
         "model_kwargs": {**tiny, "schedule": "paper"}},  # model_kwargs override single options
        {"name": "p", "arch": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": tiny},
    ]))
    registry = load_registry(parse_settings([]))
    cfg = {name: registry.get(name).model.evit_cfg for name in ("a", "b", "p")}
    assert cfg["a"] == evit.create_model("vit_tiny_patch16_224", **tiny, **evit.ACCURATE).evit_cfg
    assert (cfg["b"].fusion, cfg["b"].prune_blocks, cfg["b"].size_attn) == ("nearest", (1, 2, 3), True)
    assert (cfg["p"].fusion, cfg["p"].size_attn) == ("one", False)
    assert registry.get("p").info()["fusion"] == "one" and registry.get("a").info()["fusion"] == "nearest"
    monkeypatch.delenv("EVIT_MODELS")
    (spec,) = parse_settings(["--random-weights"]).model_specs()  # the flat form: EVIT_OPTIONS / --options
    assert spec.options == "accurate"
    assert parse_settings(["--options", "paper"]).model_specs()[0].options == "paper"
    monkeypatch.setenv("EVIT_OPTIONS", "fastest")
    with pytest.raises(ValidationError):
        parse_settings([])


@pytest.mark.parametrize("argv", [
    ["--keep-rate", "0"], ["--keep-rate", "1.5"], ["--keep-rate", "nan"], ["--device", "tpu"],
    ["--max-batch-size", "0"], ["--model", "a", "--checkpoint", "x", "--checkpoint", "y"],
    ["--model", "a=vit_tiny_patch16_224", "--model", "a=deit_small_patch16_224"],
])
def test_invalid_settings(argv, capsys) -> None:
    with pytest.raises(ValidationError):
        parse_settings(argv)
    assert main(argv) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_offline_hub_names_the_checkpoint_setting(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise evit.WeightsError("could not load timm's pretrained weights (hub unreachable)")

    monkeypatch.setattr(evit, "create_model", offline)
    monkeypatch.setattr("service.registry.hub_offline_if_unreachable", lambda: None)
    with pytest.raises(ModelLoadError) as e:
        load_registry(parse_settings(["--device", "cpu"]))
    message = str(e.value)
    assert "--checkpoint" in message and "EVIT_CHECKPOINT" in message and ASSET_CHECKPOINT in message
    assert "--random-weights" in message


def test_missing_checkpoint_exits_with_a_clear_message(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("service.__main__.configure_logging", lambda *a: None)  # keep pytest's log handlers
    argv = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(tmp_path / "absent.safetensors")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "absent.safetensors" in err and "checkpoint" in err and "Traceback" not in err


def test_keep_rate_labels_are_bucketed() -> None:
    assert [rate_label(r) for r in (1.0, 0.62, 0.625, 0.5, 0.33, 0.01, None)] == [
        "1.00", "0.60", "0.60", "0.50", "0.35", "0.05", "none"]
    assert len({rate_label(i / 1000) for i in range(1, 1001)}) == 20  # bounded cardinality


def test_every_setting_is_a_flag_with_its_default_in_help(capsys) -> None:
    from service.flags import build_parser
    from service.settings import Settings

    flags = {a.dest: a for a in build_parser()._actions}
    assert set(Settings.model_fields) - set(flags) == {"api_tokens"}  # secrets are never flags (ps shows them)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in Settings.model_fields:
        if name != "api_tokens":
            assert f"--{name.replace('_', '-')}" in text and "(default: " in flags[name].help, name
    assert "(default: 16; env EVIT_MAX_BATCH_SIZE)" in text and "(default: 8000; env EVIT_PORT, PORT)" in text


def test_env_only_settings_now_have_flags(monkeypatch) -> None:
    monkeypatch.setenv("EVIT_SEED", "5")
    monkeypatch.setenv("EVIT_HALF", "false")
    spec = {"name": "t", "arch": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": {"img_size": 32}}
    s = parse_settings(["--half", "--seed", "3", "--no-log-json", "--max-top-k", "7", "--image-formats", "JPEG,PNG",
                        "--metrics-port", "9102", "--no-jpeg-draft", "--models", json.dumps([spec]),
                        "--batch-policy", "grouped", "--low-priority-queue-share", "0.25"])
    assert (s.half, s.seed, s.log_json, s.max_top_k, s.image_formats) == (True, 3, False, 7, ("JPEG", "PNG"))
    assert (s.metrics_port, s.jpeg_draft, s.batch_policy, s.low_priority_queue_share) == (9102, False, "grouped", 0.25)
    assert s.model_specs()[0].model_kwargs == {"img_size": 32}
    s = parse_settings([])  # no flag: the environment counts
    assert (s.half, s.seed, s.log_json, s.metrics_port) == (False, 5, True, None)
    with pytest.raises(SystemExit):  # a type argparse can check is refused before pydantic
        parse_settings(["--seed", "three"])


def test_port_from_cloud_run_and_knative(monkeypatch) -> None:
    assert parse_settings([]).port == 8000
    monkeypatch.setenv("PORT", "9123")
    assert parse_settings([]).port == 9123
    monkeypatch.setenv("EVIT_PORT", "9000")  # EVIT_PORT wins over PORT, the flag over both
    assert parse_settings([]).port == 9000 and parse_settings(["--port", "9001"]).port == 9001
    monkeypatch.setenv("PORT", "99999")
    assert parse_settings([]).port == 9000  # PORT is not even read when EVIT_PORT is set
    monkeypatch.delenv("EVIT_PORT")
    with pytest.raises(ValidationError):
        parse_settings([])


def test_list_settings_take_commas(monkeypatch) -> None:
    """Every list setting takes one format from the environment: comma-separated."""
    monkeypatch.setenv("EVIT_IMAGE_FORMATS", "JPEG, PNG")
    monkeypatch.setenv("EVIT_MODEL", "a=vit_tiny_patch16_224,deit_tiny_patch16_224")
    monkeypatch.setenv("EVIT_PRUNE_BLOCKS", "3,6,9")
    monkeypatch.setenv("EVIT_API_TOKENS", "token-a-0123456789abcdef,token-b-0123456789abcdef")
    s = parse_settings([])
    assert s.image_formats == ("JPEG", "PNG") and s.prune_blocks == (3, 6, 9)
    assert s.model == ["a=vit_tiny_patch16_224", "deit_tiny_patch16_224"] and len(s.api_tokens) == 2
