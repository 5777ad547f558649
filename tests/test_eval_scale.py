"""evit-eval streams its images: peak memory on 5,000 images stays within 1.5x of that on 500.

The model reads 128x128 inputs, so holding 5,000 preprocessed images at once (as evit-eval once did) would
take 5,000 x 3 x 128 x 128 x 4 bytes = 983 MB more than 500 of them, far past 1.5x of the process's RSS.
Each run is a fresh subprocess (-j 0: decoding in that process, so its own ru_maxrss counts everything).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_KWARGS
from PIL import Image

import evit

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vit_tiny_patch16_224"
KWARGS = {**TINY_KWARGS, "img_size": 128}
PROBE = """
import resource, sys
from evit.tools import eval as e
code = e.main(sys.argv[1:])
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, code)
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder of 5,000 small noise PNGs with labels.tsv, a tiny checkpoint for 128x128 inputs)."""
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(0)
    rows = ["filename\tclass_index"]
    for i in range(5000):
        name = f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name)
        rows.append(f"{name}\t{i % 10}")
    (root / "labels.tsv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    ckpt = root / "tiny128.pth"
    torch.save(evit.create_model(ARCH, **KWARGS).state_dict(), ckpt)
    return root, ckpt


def run(dataset: tuple[Path, Path], out: Path, *extra: str) -> tuple[int, dict]:
    """(peak RSS in kB, results.json) of evit-eval in a fresh process."""
    folder, ckpt = dataset
    args = [folder.as_posix(), "--model", ARCH, "--checkpoint", str(ckpt), "--model-kwargs", json.dumps(KWARGS),
            "--keep-rates", "0.5", "-b", "50", "--threads", "1", "--quiet", "--output", str(out), *extra]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB")), None)
    assert line is not None and line.split()[2] == "0", proc.stderr[-3000:]
    return int(line.split()[1]), json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_peak_rss_flat_from_500_to_5000_images(dataset, tmp_path):
    small_kb, small = run(dataset, tmp_path / "500", "-j", "0", "--limit", "500")
    large_kb, large = run(dataset, tmp_path / "5000", "-j", "0")
    assert (small["num_images"], large["num_images"]) == (500, 5000)
    assert large["rows"][0]["images"] == 5000
    print(f"peak RSS: {small_kb / 1024:.0f} MiB on 500 images, {large_kb / 1024:.0f} MiB on 5000")
    assert large_kb <= 1.5 * small_kb, (small_kb, large_kb)


def test_worker_processes_give_the_same_rows(dataset, tmp_path):
    """-j 2 (timm's loader with worker processes) scores exactly what decoding in-process scores."""
    _, inline = run(dataset, tmp_path / "j0", "-j", "0", "--limit", "120")
    _, workers = run(dataset, tmp_path / "j2", "-j", "2", "--limit", "120")
    keys = ("top1", "top5", "tokens", "images", "gmacs")
    assert [{k: r[k] for k in keys} for r in workers["rows"]] == [{k: r[k] for k in keys} for r in inline["rows"]]
    assert workers["workers"] == 2 and inline["rows"][0]["images"] == 120
