"""Environment variables and default paths: the one place kdutils reads the environment.

==================  =========================================  ==========================
variable            meaning                                    default
==================  =========================================  ==========================
``KD_PROFILE``      overrides every chapter's ``profile``      the chapter's own value
``KD_DATA_DIR``     where datasets live (and their caches)     ``<project>/data``
``KD_CKPT_DIR``     checkpoints, teacher cache included        ``<project>/checkpoints``
``KD_RESULTS_DIR``  run records (one JSON file per run)        ``<project>/results``
``KD_KEEP_MEMORY``  ``1``: CPU runs keep the memory a step     off
                    frees (:class:`kdutils.speed.Speed`)
==================  =========================================  ==========================

``<project>`` is the nearest folder, from the working directory upwards, that holds the
book's ``_toc.yml``; outside the project it is the working directory. On Colab, point
``KD_CKPT_DIR`` at a Google Drive folder so that a disconnect costs nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
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


def shown_path(path: str | Path) -> str:
    """``path`` as a page or a message may show it: relative to the project (``results``), else
    to the home folder (``~/.cache/...``), else its name alone; never a machine's full path."""
    p = Path(path).expanduser().resolve()
    for base, prefix in ((project_root(), ""), (Path.home(), "~/")):
        if p == base.resolve() or base.resolve() in p.parents:
            return prefix + str(p.relative_to(base.resolve()))
    return p.name


def shown_command(command: str) -> str:
    """A command line as a page may show it: every absolute path in it through :func:`shown_path`."""
    return " ".join(shown_path(w) if os.path.isabs(w) else w for w in command.split())


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


KEEP_MEMORY_VAR = "KD_KEEP_MEMORY"


def keep_memory_default() -> bool:
    """Whether ``$KD_KEEP_MEMORY`` asks CPU runs to keep the memory a step frees
    (:func:`kdutils.speed.keep_freed_memory`) where ``Speed.keep_memory`` is left at None:
    ``1`` (or ``true``, ``yes``, ``on``) turns it on; unset or anything else leaves it off."""
    return os.environ.get(KEEP_MEMORY_VAR, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run executes, none of which changes its numbers: the profile (it names
    the run's files), the device, where checkpoints and records go, and progress bars."""

    profile: str = "full"
    device: str = "auto"
    ckpt_dir: str | Path | None = None
    results_dir: str | Path | None = None
    progress: bool = True


RUN_OPTIONS = tuple(f.name for f in fields(RunOptions))


def run_options(P) -> RunOptions:
    """The :class:`RunOptions` of a chapter's parameters ``P``."""
    return RunOptions(**{name: P[name] for name in RUN_OPTIONS})
