import subprocess
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session from the committed outputs, warnings as errors and
    every cross-reference checked (nitpicky, offline: external types are listed in _config.yml)."""
    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed")
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(["jupyter-book", "build", str(ROOT), "--path-output", str(out),
                           "-W", "-n", "--keep-going"], capture_output=True, text=True, timeout=900)
    return out / "_build" / "html", proc


@pytest.fixture
def tiny():
    """96 synthetic 32x32 images (64 to train, 32 to test) with a learnable signal in the red
    channel: enough for a run to learn something in an epoch or two."""
    import torch

    import kdutils as kd
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 10
    x = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=g)
    x[:, 0] = (y * 25).to(torch.uint8).view(-1, 1, 1)
    return kd.data.ImageData(x[:64], y[:64], x[64:], y[64:], kd.data.CIFAR10_CLASSES, "synthetic")
