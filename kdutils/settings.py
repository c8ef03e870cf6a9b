"""Environment variables and default paths: the one place kdutils reads the environment.

==================  =========================================  ==========================
variable            meaning                                    default
==================  =========================================  ==========================
``KD_PROFILE``      overrides every chapter's ``profile``      the chapter's own value
``KD_DATA_DIR``     where datasets live (and their caches)     ``<project>/data``
``KD_CKPT_DIR``     checkpoints, teacher cache included        ``<project>/checkpoints``
``KD_RESULTS_DIR``  run records (one JSON file per run)        ``<project>/results``
==================  =========================================  ==========================

``<project>`` is the nearest folder, from the working directory upwards, that holds the
book's ``_toc.yml``; outside the project it is the working directory. On Colab, point
``KD_CKPT_DIR`` at a Google Drive folder so that a disconnect costs nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

PROFILE_VAR = "KD_PROFILE"
DATA_VAR = "KD_DATA_DIR"
CKPT_VAR = "KD_CKPT_DIR"
RESULTS_VAR = "KD_RESULTS_DIR"


def project_root(start: str | Path | None = None) -> Path:
    """The nearest ancestor of ``start`` (default: the working directory) holding ``_toc.yml``."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file():
            return folder
    return here


def _folder(value: str | Path | None, var: str, default_name: str) -> Path:
    if value is not None:
        return Path(value).expanduser()
    if os.environ.get(var):
        return Path(os.environ[var]).expanduser()
    return project_root() / default_name


def data_dir(value: str | Path | None = None) -> Path:
    """``value``, else ``$KD_DATA_DIR``, else ``<project>/data``."""
    return _folder(value, DATA_VAR, "data")


def ckpt_dir(value: str | Path | None = None) -> Path:
    """``value``, else ``$KD_CKPT_DIR``, else ``<project>/checkpoints``."""
    return _folder(value, CKPT_VAR, "checkpoints")


def results_dir(value: str | Path | None = None) -> Path:
    """``value``, else ``$KD_RESULTS_DIR``, else ``<project>/results``."""
    return _folder(value, RESULTS_VAR, "results")


def profile_override() -> str | None:
    """The profile forced by ``$KD_PROFILE`` (CI sets ``smoke``), or None."""
    return os.environ.get(PROFILE_VAR) or None


RUN_OPTIONS = ("profile", "device", "ckpt_dir", "results_dir", "progress")


def run_options(P) -> dict:
    """What every run takes from a chapter's parameters ``P`` besides its recipe: the profile
    (it names the run's files), the device, where checkpoints and records go, progress bars."""
    return {name: P[name] for name in RUN_OPTIONS}
