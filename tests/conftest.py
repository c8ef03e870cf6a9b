import subprocess
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built_book(tmp_path_factory):
    """The book built once per test session from the committed outputs, warnings as errors."""
    if shutil.which("jupyter-book") is None:
        pytest.skip("jupyter-book is not installed")
    out = tmp_path_factory.mktemp("book")
    proc = subprocess.run(["jupyter-book", "build", str(ROOT), "--path-output", str(out),
                           "-W", "--keep-going"], capture_output=True, text=True, timeout=900)
    return out / "_build" / "html", proc
