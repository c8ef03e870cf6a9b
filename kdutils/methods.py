"""The Part I methods: what each needs from the teacher, and its training step (chapters 2-5).

A method is two small functions: ``*_targets(teacher, x) -> dict`` (what the loss needs from
the frozen teacher) and ``*_step(model, x, y, t) -> loss``. The chapters display them with
:func:`kdutils.show`; :func:`run_method` trains one method over several seeds with the one loop.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .losses import ce_loss, cosine_loss, hint_loss, kd_loss, pool_to_dim
from .models import build
from .train import Recipe, Run, fit, is_finished, pick_device, precompute_teacher, run_paths

STUDENT_HIDDEN = 1024  # LightNN's flattened feature map: 16 x 8 x 8


# ---- chapter 2: cross-entropy only -------------------------------------------------------
def ce_step(model, x, y, t):
    """Cross-entropy with the labels; no teacher."""
    return ce_loss(model(x), y)


# ---- chapter 3: Hinton KD ----------------------------------------------------------------
def kd_targets(teacher, x):
    """The teacher's logits."""
    return {"logits": teacher(x)}


def kd_step(model, x, y, t, *, T=5.0, alpha=0.5):
    """``alpha * T^2 * KL(p^T || q^T) + (1 - alpha) * CE``, with the teacher's logits in ``t``."""
    return kd_loss(model(x), t["logits"], y, T=T, alpha=alpha)


# ---- chapter 4: cosine loss on hidden states ---------------------------------------------
def cosine_targets(teacher, x, dim=STUDENT_HIDDEN):
    """The teacher's 2048-value feature map, averaged in pairs down to the student's 1024."""
    _, h = teacher(x, return_features=True)
    return {"hidden": pool_to_dim(h, dim)}


def cosine_step(model, x, y, t, *, hidden_weight=0.3, ce_weight=0.7):
    """Cosine distance between hidden states plus cross-entropy."""
    logits, h = model(x, return_features=True)
    return cosine_loss(logits, h, t["hidden"], y, hidden_weight, ce_weight)


# ---- chapter 5: FitNets hint with a regressor --------------------------------------------
class HintStudent(nn.Module):
    """A student plus the regressor that maps its feature map onto the teacher's.

    ``forward`` is the student alone (what is evaluated and deployed); the regressor
    (conv 3x3, 16 -> 32 channels, 4,640 parameters) exists only for training.
    """

    def __init__(self, student: nn.Module, in_channels=16, out_channels=32):
        super().__init__()
        self.student = student
        self.regressor = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x, return_features=False):
        return self.student(x, return_features=return_features)

    @property
    def deployed(self) -> nn.Module:
        """What is kept after training: the student alone."""
        return self.student


def hint_targets(teacher, x):
    """The teacher's last feature map, ``(N, 32, 8, 8)``."""
    _, h = teacher(x, return_features=True)
    return {"map": h}


def hint_step(model, x, y, t, *, hint_weight=0.7, ce_weight=0.3):
    """MSE between the regressed student map and the teacher's map, plus cross-entropy."""
    logits, f = model.student(x, return_features=True)
    return hint_loss(logits, model.regressor(f), t["map"], y, hint_weight, ce_weight)


def _hint_model(seed):
    student = build("lightnn", seed=seed)  # the same initial student as every other method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return HintStudent(student)


# name -> (home chapter, step, teacher targets, model builder, its weights' names)
METHODS = {
    "ce": ("baseline", ce_step, None, lambda s: build("lightnn", seed=s), ()),
    "kd": ("hinton", kd_step, kd_targets, lambda s: build("lightnn", seed=s), ("T", "alpha")),
    "cosine": ("cosine", cosine_step, cosine_targets, lambda s: build("lightnn", seed=s),
               ("hidden_weight", "ce_weight")),
    "hint": ("regressor", hint_step, hint_targets, _hint_model, ("hint_weight", "ce_weight")),
}
DEFAULT_WEIGHTS = {"kd": {"T": 5.0, "alpha": 0.5}, "cosine": {"hidden_weight": 0.3, "ce_weight": 0.7},
                   "hint": {"hint_weight": 0.7, "ce_weight": 0.3}}


def run_method(method: str, data, *, seeds, epochs, batch_size=128, lr=1e-3, teacher: Run | None = None,
               profile="full", device="auto", ckpt_dir=None, results_dir=None, progress=True,
               **weights) -> list[Run]:
    """Train the student of ``method`` once per seed (or reload finished runs); one record each.

    The teacher's outputs are computed once and shared by all seeds (exact: no augmentation).
    ``weights`` are the method's loss weights (``T``, ``alpha``, ...); missing ones take R5's.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    chapter, step, targets, make, names = METHODS[method]
    unknown = set(weights) - set(names)
    if unknown:
        raise ValueError(f"method {method!r} takes the weights {names}, not {sorted(unknown)}")
    w = {**DEFAULT_WEIGHTS.get(method, {}), **weights}
    if targets is not None and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    step_fn = partial(step, **w) if w else step
    shared = dict(chapter=chapter, method=method, step=step_fn, params=w, profile=profile,
                  device=device, ckpt_dir=ckpt_dir, results_dir=results_dir, progress=progress)
    outputs = None
    runs = []
    for seed in seeds:
        recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        model = make(seed)
        kw = {}
        if targets is not None:
            kw = dict(teacher=teacher.model, teacher_targets=targets,
                      teacher_key=teacher.record["run_key"])
            _, ckpt, _ = run_paths(model, data, recipe, chapter=chapter, method=method, params=w,
                                   profile=profile, teacher_key=kw["teacher_key"], ckpt_dir=ckpt_dir)
            if outputs is None and not is_finished(ckpt, recipe.epochs):  # a reload needs no teacher pass
                outputs = precompute_teacher(teacher.model.to(pick_device(device)).eval(),
                                             targets, data, pick_device(device))
            kw["teacher_outputs"] = outputs
        runs.append(fit(model, data, recipe, **shared, **kw))
    return runs

