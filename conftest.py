"""Test-suite set-up, shared by the unit tests (tests/) and the notebooks (book/, via nbmake).

* Every chapter runs with ``KD_PROFILE=smoke`` (unless the caller set another profile).
* Checkpoints and run records go to a temporary folder, never into the committed results/.
* Data: ``$KD_DATA_DIR`` if set; otherwise the JPEG copy of CIFAR-10 in ``../shared/data/``
  is extracted once into ``.data/cifar10-jpeg/`` (ignored by git) and used.
"""
import os
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
EXTRACTED = ROOT / ".data" / "cifar10-jpeg"


def _data_dir() -> str | None:
    if os.environ.get("KD_DATA_DIR"):
        return os.environ["KD_DATA_DIR"]
    if (EXTRACTED / "test").is_dir() and (EXTRACTED / "train").is_dir():
        return str(EXTRACTED)
    if ARCHIVE.is_file():
        from filelock import FileLock
        EXTRACTED.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(EXTRACTED) + ".lock"):
            if not (EXTRACTED / "test").is_dir():
                tmp = Path(tempfile.mkdtemp(dir=EXTRACTED.parent))
                with tarfile.open(ARCHIVE) as tar:
                    tar.extractall(tmp, filter="data")
                tmp.rename(EXTRACTED)
        return str(EXTRACTED)
    return None


def pytest_configure(config):
    os.environ.setdefault("KD_PROFILE", "smoke")
    run_dir = Path(tempfile.mkdtemp(prefix="kd-tests-"))
    os.environ.setdefault("KD_CKPT_DIR", str(run_dir / "checkpoints"))
    os.environ.setdefault("KD_RESULTS_DIR", str(run_dir / "results"))
    data = _data_dir()
    if data:
        os.environ["KD_DATA_DIR"] = data
