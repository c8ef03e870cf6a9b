"""Checkpoints: atomic writes, safe loads, clear errors (introduced in chapter 2).

* :func:`atomic_save` writes to a temporary file in the same folder, flushes it to disk and
  renames it over the target, so a reader (or a run killed mid-write) never sees half a file.
* :func:`load_checkpoint` always uses ``torch.load(..., weights_only=True)``: a checkpoint
  can hold tensors, numbers, strings, lists and dicts, never code to run.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, truncated, unsafe, or does not fit the model."""


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | Path) -> None:
    """Write ``obj`` as indented JSON through a temporary file and an atomic rename."""
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    _atomic_write(Path(path), lambda f: f.write(data))


def load_checkpoint(path: str | Path, map_location="cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``; raise :class:`CheckpointError` if unusable."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it holds Python objects that are not plain data (refused for safety)"
        else:
            reason = f"it is truncated or corrupted ({msg})"
        raise CheckpointError(
            f"cannot load checkpoint {path}: {reason}. Delete the file to start that run "
            "over, or point ckpt_dir at a folder with a good copy.") from None


def load_state_dict_strict(model: torch.nn.Module, state: dict, source: str = "checkpoint") -> None:
    """``model.load_state_dict(state)``, failing with the mismatched keys and shapes named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + "; ".join(shapes[:5]) + (" ..." if len(shapes) > 5 else ""))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:5])
                         + (" ..." if len(unexpected) > 5 else ""))
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state)
