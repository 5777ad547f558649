"""evit.config: a leaf module (no evit import, no torch); one keep-rate rule used by library, CLI and service."""

from __future__ import annotations

import argparse
import ast
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

import evit
from evit.config import EViTConfig, check_keep_rate, keep_count
from evit.tools.cli import keep_rates
from service.settings import Settings

BAD = [0.0, -0.5, 1.5, math.nan, math.inf, True, "0.5", None]


def test_config_is_a_leaf() -> None:
    tree = ast.parse((Path(evit.__file__).parent / "config.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported <= {"__future__", "math", "dataclasses"}, imported


@pytest.mark.parametrize("value", BAD)
def test_one_keep_rate_rule_everywhere(value) -> None:
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
        check_keep_rate(value)
    if isinstance(value, float):
        with pytest.raises(ValueError):
            EViTConfig((1,), keep_rate=value)
        with pytest.raises(argparse.ArgumentTypeError):
            keep_rates(f"1.0,{value}")
        with pytest.raises(ValidationError):
            Settings(keep_rate=value)
        with pytest.raises(ValidationError):
            Settings(auto_min_keep_rate=value)


def test_good_keep_rates_pass_and_keep_count_rounds_up() -> None:
    assert [check_keep_rate(v) for v in (1, 1.0, 0.25, 1e-9)] == [1.0, 1.0, 0.25, 1e-9]
    assert keep_rates("1.0,0.7") == [1.0, 0.7] and Settings(keep_rate=0.3).keep_rate == 0.3
    assert keep_count(0.7, 10) == 7 and keep_count(0.71, 10) == 8 and keep_count(1e-9, 10) == 1
