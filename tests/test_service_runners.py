"""The runner contract (service.runners): the torch runner runs any keep rate exactly, per sample."""

from __future__ import annotations

import pytest
import torch
from _tiny import images, tiny_pair

import evit
from service.runners import Runner, snap_to
from service.runners.torch import TorchRunner


@pytest.fixture(scope="module")
def runner() -> TorchRunner:
    _, model = tiny_pair(keep_rate=0.7)
    return TorchRunner(model, torch.device("cpu"), name="vit_tiny_patch16_224")


def test_info_describes_the_model(runner: TorchRunner) -> None:
    info, model = runner.info, runner.model
    assert isinstance(runner, Runner)
    assert info.backend == "torch" and info.precision == "fp32" and info.device == "cpu"
    assert info.prune_blocks == model.evit_cfg.prune_blocks and info.default_keep_rate == 0.7
    assert info.grid == (4, 4) and info.num_patches == 16 == model.num_patches
    assert info.input_size == (3, 32, 32) == tuple(runner.data_config["input_size"])
    assert runner.data_config == evit.data_config(model) and info.num_classes == model.num_classes
    assert info.keep_rates is None and info.fusion == "one" and info.fuse


def test_any_rate_runs_exactly_per_sample(runner: TorchRunner) -> None:
    x = images(3)
    rates = [0.37, 1.0, 0.61]
    assert [runner.snap(r) for r in rates] == rates
    out = runner.forward(list(x), rates, return_kept=True)
    assert out.logits.dtype == torch.float32 and out.logits.device.type == "cpu" and out.logits.shape[0] == 3
    for i, r in enumerate(rates):
        alone = runner.model.forward_with_info(x[i : i + 1], keep_rate=r, return_kept=True)
        torch.testing.assert_close(out.logits[i], alone.logits[0], rtol=1e-4, atol=1e-5)
        assert out.tokens[i] == int(alone.tokens[0]) == runner.cost(r).total_tokens
        assert out.kept is not None
        assert out.kept[i] == [stage[0].nonzero().flatten().tolist() for stage in alone.kept]
    assert runner.forward(list(x), rates).kept is None


def test_snap_to_buckets() -> None:
    assert snap_to(None, 0.42) == 0.42
    assert snap_to((0.5, 0.7, 1.0), 0.6) == 0.7 and snap_to((0.5, 0.7, 1.0), 0.5) == 0.5
    assert snap_to((0.5, 0.7, 1.0), 0.3) == 0.5 and snap_to((0.5, 0.7), 0.9) == 0.7
