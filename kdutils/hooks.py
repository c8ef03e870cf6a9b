"""Forward hooks that capture intermediate outputs by module name (Part II).

Which layers feed a loss is declared by name, not wired into the model::

    with capture(model, ["layer2", "layer4"]) as feats:
        logits = model(x)
    loss = feature_loss(feats["layer2"], feats["layer4"])

The hooks are removed when the ``with`` block ends, also after an exception.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


@contextmanager
def capture(model: nn.Module, names: list[str] | tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the submodules ``names`` (as in ``model.named_modules()``)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        known = [n for n in modules if n and "." not in n]
        raise KeyError(f"{type(model).__name__} has no submodule {', '.join(map(repr, missing))}; "
                       f"top-level submodules: {', '.join(known)}")
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module, _inputs, output, name=name):
            outputs[name] = output
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()
