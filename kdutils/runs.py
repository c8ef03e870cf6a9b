"""A run's files: its key, checkpoint and record, resuming and saving (chapter 2).

Everything that defines a run (chapter, method, recipe, loss weights, data, teacher, model)
is hashed into a short key; the checkpoint and the record are named by it. Starting the same
run again therefore finds its checkpoint and continues from the last finished epoch. The
code a run ran (:func:`kdutils.fingerprint.code_fingerprint`) is saved beside the key: a
checkpoint made by other code is trained again rather than reloaded.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import settings
from .checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict
from .fingerprint import changed, code_fingerprint, is_stale
from .models import builders
from .results import write_record
from .settings import RunOptions


@dataclass
class Run:
    """What :func:`kdutils.train.fit` returns: the trained model, its run record and where
    it is stored."""

    model: nn.Module
    record: dict
    checkpoint: Path
    record_path: Path | None = None
    resumed_from_epoch: int = 0

    @property
    def history(self):
        import pandas as pd
        return pd.DataFrame(self.record["history"])

    @property
    def test_acc(self) -> float:
        return self.record["test_acc"]


def run_key(**parts) -> str:
    """A short, stable hash of everything that defines a run."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def weights_hash(model: nn.Module) -> str:
    """A short hash of a network's weights and buffers (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:10]


def teacher_identity(teacher) -> str | None:
    """What names a :class:`~kdutils.loop.Teacher` in a run's key: its ``key``, else a hash
    of its weights (two teachers that differ only in weights teach two different runs)."""
    if teacher is None:
        return None
    return teacher.key or weights_hash(teacher.model)


def run_paths(model: nn.Module, data, recipe, *, chapter: str, method: str, params: dict,
              teacher=None, options: RunOptions = RunOptions()) -> tuple[str, Path, Path]:
    """The run's key, checkpoint path and record path. The key hashes all that defines the
    run: chapter, method, recipe, loss weights, data, teacher, the network's class and its
    initial weights (so call this before training)."""
    key = run_key(chapter=chapter, method=method, recipe=recipe.key(), params=params,
                  data=data.source, train=len(data.train_y), test=len(data.test_y),
                  teacher=teacher_identity(teacher), model=type(model).__name__,
                  init=weights_hash(model))
    name = f"{method}-{options.profile}-seed{recipe.seed}-{key}"
    return (key, settings.ckpt_dir(options.ckpt_dir) / chapter / f"{name}.pt",
            settings.results_dir(options.results_dir) / chapter / f"{name}.json")


def run_code(model: nn.Module, step, teacher_targets=None, teacher: nn.Module | None = None) -> dict:
    """The fingerprint of what a run's numbers depend on beyond its key: the loss step, the
    teacher's targets, the student's and the teacher's classes and the builders that made
    them, with the book's functions they call (:func:`kdutils.fingerprint.code_fingerprint`).
    The loop around the step (``train_epoch``, loaders, augmentation) is not part of it."""
    nets = [m for m in (model, teacher) if m is not None]
    return code_fingerprint(step, teacher_targets, *nets, *(b for m in nets for b in builders(m)))


def is_finished(checkpoint: Path, epochs: int, code: dict | None = None) -> bool:
    """Whether ``checkpoint`` exists and holds all ``epochs`` of its run (made by ``code``, a
    fingerprint, when one is given)."""
    try:
        state = load_checkpoint(checkpoint) if checkpoint.is_file() else {}
    except (CheckpointError, OSError):
        return False
    return state.get("epoch") == epochs and not (code is not None and changed(state.get("code"), code))


def same_training(recorded: list | None, history: list) -> bool:
    """Whether a record's per-epoch history is the checkpoint's: same epochs, and each epoch's
    test accuracy and seconds equal. The seconds differ between any two trainings, so a record
    left by another training of the same run (another machine, an earlier try) never matches."""
    if not recorded or len(recorded) != len(history):
        return False
    return all(math.isclose(a.get("test_acc", math.nan), b["test_acc"], rel_tol=1e-9)
               and math.isclose(a.get("seconds", math.nan), b["seconds"], rel_tol=1e-9)
               for a, b in zip(recorded, history))


def existing_record(record_path: Path, checkpoint: Path, history: list) -> dict | None:
    """The record of the finished run whose checkpoint holds ``history``, if it was written.
    A record of this key left by another training (another machine, an earlier try) does
    not describe these weights: None, with a line saying it will be rewritten."""
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text())
    if same_training(record.get("history"), history):
        return record
    print(f"{record_path.name} described another training of this run (its epochs "
          f"differ from the checkpoint's); rewritten from {checkpoint.name}")
    return None


def check_writable(folder: Path) -> None:
    """Create ``folder`` and write a file in it, or say which folder and how to choose another."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".kdutils-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to {folder} ({e.strerror or e}); choose another "
                              "folder with ckpt_dir / results_dir or KD_CKPT_DIR / KD_RESULTS_DIR")


@dataclass(frozen=True)
class RunFiles:
    """Where one run keeps its state: the checkpoint after every epoch (weights, optimiser,
    schedule, scaler, history), the best-validation weights, and the record. ``code`` is
    the fingerprint of the code about to train (None: not checked)."""

    key: str
    checkpoint: Path
    record_path: Path
    code: dict | None = None

    @property
    def best(self) -> Path:
        return self.checkpoint.with_name(self.checkpoint.stem + ".best.pt")

    def resume(self, model, optimizer, scheduler, scaler, device) -> tuple[list, int, float]:
        """Load the last checkpoint into the training state, if there is one; returns the
        history so far, the next epoch and the seconds spent outside epochs. A checkpoint
        made by other code (its fingerprint differs from ``code``) is not used: the run starts
        over, with a line naming what changed."""
        if not self.checkpoint.is_file():
            return [], 0, 0.0
        state = load_checkpoint(self.checkpoint, map_location=device)
        if state.get("key") != self.key:
            raise CheckpointError(f"checkpoint {self.checkpoint} belongs to another run (key "
                                  f"{state.get('key')!r}, expected {self.key!r}); delete it to "
                                  "start over")
        if is_stale(state.get("code"), self.code, self.checkpoint.name):
            return [], 0, 0.0
        load_state_dict_strict(model, state["model"], str(self.checkpoint))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        return state["history"], state["epoch"], state.get("extra_s", 0.0)

    def save(self, model, optimizer, scheduler, scaler, history: list, extra_s: float) -> None:
        """Everything needed to continue after the last epoch of ``history``."""
        atomic_save({"key": self.key, "epoch": len(history), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict() if scheduler is not None else None,
                     "scaler": scaler.state_dict() if scaler is not None else None,
                     "history": history, "extra_s": extra_s, "code": self.code}, self.checkpoint)

    def save_best(self, model, epoch: int) -> None:
        atomic_save({"key": self.key, "epoch": epoch, "model": model.state_dict()}, self.best)

    def load_best(self, model, device) -> None:
        state = load_checkpoint(self.best, map_location=device)
        load_state_dict_strict(model, state["model"], str(self.best))

    def existing_record(self, history: list) -> dict | None:
        """:func:`existing_record` of this run's record and checkpoint."""
        return existing_record(self.record_path, self.checkpoint, history)

    def write_record(self, record: dict) -> Path:
        return write_record(record, self.record_path)
