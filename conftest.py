"""Test-suite set-up, shared by the unit tests (tests/) and the notebooks (book/, via nbmake).

* Every chapter runs with ``KD_PROFILE=smoke`` (unless the caller set another profile).
* Checkpoints and run records go to a temporary folder, never into the committed results/.
* Data: where the chapters find it (:func:`kdutils.data.find_data`): ``$KD_DATA_DIR`` if set,
  otherwise the lossless PNG archives of CIFAR-10 in ``../shared/data/``, extracted once into
  ``.data/cifar10-png/`` (ignored by git).
"""
import os
import tempfile
from pathlib import Path


def pytest_configure(config):
    os.environ.setdefault("KD_PROFILE", "smoke")
    run_dir = Path(tempfile.mkdtemp(prefix="kd-tests-"))
    os.environ.setdefault("KD_CKPT_DIR", str(run_dir / "checkpoints"))
    os.environ.setdefault("KD_RESULTS_DIR", str(run_dir / "results"))
    from kdutils.data import find_data
    data = find_data()
    if (data / "train").is_dir():   # found: the notebooks' kernels need not look again
        os.environ["KD_DATA_DIR"] = str(data)
