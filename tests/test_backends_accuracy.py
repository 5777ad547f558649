"""make serve's default CPU backend (OpenVINO fp32) keeps accuracy on the real weights: top-1 within 0.4 points
of eager fp32 and the same top-1 class on >= 99% of the 500 sample images (docs/backends.md: the full table)."""

from __future__ import annotations

import pytest
from conftest import IMAGES, WEIGHTS

from evit.tools import backends

pytestmark = [pytest.mark.slow, pytest.mark.isolated,  # OpenVINO sessions: in a child process (tests/_isolated.py)
              pytest.mark.skipif(not (WEIGHTS.exists() and IMAGES.exists()), reason="../shared/assets absent")]

SETTINGS = [("paper", 1.0), ("paper", 0.7), ("accurate", 0.5)]  # 500 images each: the suite stays short


@pytest.mark.parametrize(("options", "rate"), SETTINGS)
def test_openvino_fp32_keeps_top1(real_data, options: str, rate: float) -> None:
    model, x, y = real_data
    try:
        (row,) = backends.run(model, x, y, ["openvino:fp32"], [rate], [options])
    finally:
        backends.evit.apply_patch(model)  # the shared fixture's model back to the paper's rule
    assert abs(row["delta"]) <= 0.4, row
    assert row["agreement"] >= 99.0, row
