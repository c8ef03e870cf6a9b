"""Every student method of the book: what it needs from the teacher, and its training step.

A method is two small functions: ``*_targets(teacher, x) -> dict`` (what the loss needs from
the frozen teacher) and ``*_step(model, x, y, t) -> {name: loss term}``, plus, for a method
that trains extra modules (a regressor, a projection), the wrapper that holds them. They are
registered once, by name, in :data:`METHODS`; :func:`train_seeds` trains a registered method
over several seeds with the one loop (:func:`kdutils.train.fit`).
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import capture
from .loop import Progress, Teacher, ce_step
from .losses import (byot_terms, ce_loss, cosine_terms, dkd_terms, hint_terms, kd_terms,
                     pool_to_dim, soft_target_loss)
from .models import build
from .runs import Run
from .settings import RunOptions
from .speed import Speed
from .train import Recipe, fit

STUDENT_HIDDEN = 1024  # LightNN's flattened feature map: 16 x 8 x 8


# ---- chapter 3: Hinton KD ----------------------------------------------------------------
def kd_targets(teacher, x):
    """The teacher's logits."""
    return {"logits": teacher(x)}


def kd_step(model, x, y, t, *, T=5.0, alpha=0.5):
    """``alpha * T^2 * KL(p^T || q^T)`` and ``(1 - alpha) * CE``, with the teacher's logits in
    ``t``: two named terms, which the loop adds up (and records apart)."""
    return kd_terms(model(x), t["logits"], y, T=T, alpha=alpha)


# ---- chapter 4: cosine loss on hidden states ---------------------------------------------
def cosine_targets(teacher, x, dim=STUDENT_HIDDEN):
    """The teacher's 2048-value feature map, averaged in pairs down to the student's 1024."""
    _, h = teacher(x, return_features=True)
    return {"hidden": pool_to_dim(h, dim)}


def cosine_step(model, x, y, t, *, hidden_weight=0.3, ce_weight=0.7):
    """Cosine distance between hidden states plus cross-entropy."""
    logits, h = model(x, return_features=True)
    return cosine_terms(logits, h, t["hidden"], y, hidden_weight, ce_weight)


# ---- chapter 5: FitNets hint with a regressor --------------------------------------------
class TrainingWrapper(nn.Module):
    """A network that is deployed alone, wrapped with modules only its training uses (a
    regressor, a projection). Being inside the wrapper, they are in ``model.parameters()``,
    so the optimiser trains them, and in its checkpoint.

    ``forward`` is the network alone, what is evaluated; ``deployed`` is the network, what is
    kept after training. A subclass names the attribute holding it in ``deployed_name``.
    """

    deployed_name = "student"

    def forward(self, x, **kwargs):
        return self.deployed(x, **kwargs)

    @property
    def deployed(self) -> nn.Module:
        """What is kept after training: the network without the training-only modules."""
        return getattr(self, self.deployed_name)


class HintStudent(TrainingWrapper):
    """A student plus the regressor that maps its feature map onto the teacher's (conv 3x3,
    16 -> 32 channels, 4,640 parameters, for training only)."""

    def __init__(self, student: nn.Module, in_channels=16, out_channels=32):
        super().__init__()
        self.student = student
        self.regressor = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def hint_targets(teacher, x):
    """The teacher's last feature map, ``(N, 32, 8, 8)``."""
    _, h = teacher(x, return_features=True)
    return {"map": h}


def hint_step(model, x, y, t, *, hint_weight=0.7, ce_weight=0.3):
    """MSE between the regressed student map and the teacher's map, plus cross-entropy."""
    logits, f = model(x, return_features=True)  # the forward goes through model(...): see fit()
    return hint_terms(logits, model.regressor(f), t["map"], y, hint_weight, ce_weight)


def wrapped_in(wrapper: type) -> Callable[[nn.Module, int], nn.Module]:
    """``(student, seed) -> wrapper(student)``, the wrapper's own modules (a regressor, a
    projection) drawn from ``seed + 1``: the student's initial weights stay those of every
    other method's student of the same seed."""
    def wrap(student: nn.Module, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            return wrapper(student)
    return wrap


# ---- Decoupled KD (Zhao et al. 2022) ---------------------------------------------------------
def dkd_step(model, x, y, t, *, alpha=1.0, beta=8.0, T=4.0, warmup=20, ce_weight=1.0,
             progress: Progress | None = None):
    """Cross-entropy plus DKD's target-class and non-target-class terms
    (:func:`kdutils.losses.dkd_terms`; the paper's CIFAR-100 defaults). Both DKD terms rise
    linearly over the first ``warmup`` epochs: ``min((epoch + 1) / warmup, 1)``."""
    s = model(x)
    ramp = 1.0 if progress is None else min((progress.epoch + 1) / warmup, 1.0)
    terms = dkd_terms(s, t["logits"], y, alpha=alpha, beta=beta, T=T)
    return {"ce": ce_weight * ce_loss(s, y), **{k: ramp * v for k, v in terms.items()}}


# ---- Part II: self-distillation across exits (R1) -----------------------------------------
def byot_step(model, x, y, t, *, T=4.0, kd_weight=0.7, feature_weight=0.3, detach_teacher=False):
    """R1's loss on a multi-exit network: every exit learns the labels, the shallow exits
    also the deepest exit's soft predictions and (detached) feature map."""
    logits, feats = model(x)
    return byot_terms(logits, feats, y, T=T, kd_weight=kd_weight, feature_weight=feature_weight,
                      detach_teacher=detach_teacher)


# ---- Part II: feature self-distillation through forward hooks (R3) --------------------------
class HookSelfDistill(TrainingWrapper):
    """A network plus the trainable 1x1 projection of a layer4 -> layer2 feature loss (R3).

    The projection (128 -> 512 channels) maps the shallow map, the student's side, onto the
    deep one, the teacher's side. Inside the wrapper it is trained (R3 created it outside the
    model and never trained it) and never deployed.
    """

    deployed_name = "net"

    def __init__(self, net: nn.Module, deep="layer4", shallow="layer2", deep_ch=512, shallow_ch=128):
        super().__init__()
        self.net, self.deep, self.shallow = net, deep, shallow
        self.proj = nn.Conv2d(shallow_ch, deep_ch, kernel_size=1)


def hook_sd_step(model, x, y, t, *, hook_weight=0.5):
    """``hook_weight * MSE(proj(pool(layer2)), layer4.detach()) + (1 - hook_weight) * CE``.

    Both maps are captured by forward hooks; layer2's map is average-pooled to layer4's
    spatial size and projected to its channels. The deep map is the teacher: it is detached,
    so the term trains layer2 (and the layers before it) and the projection, never layer3 or
    layer4, and its target cannot shrink to meet the student. ``hook_weight=0`` is the
    baseline without the term: the loss and every gradient of the network are plain
    cross-entropy's (the projection still runs, so that all trainable parameters take part
    in every step, as DistributedDataParallel expects).
    """
    with capture(model.net, [model.shallow, model.deep]) as f:
        logits = model(x)
    deep, shallow = f[model.deep].detach(), f[model.shallow]
    shallow = F.adaptive_avg_pool2d(shallow, deep.shape[-2:])
    return {"hook": hook_weight * F.mse_loss(model.proj(shallow), deep),
            "ce": (1 - hook_weight) * ce_loss(logits, y)}


# ---- Part II: a pretrained teacher into a small CNN (R4) ----------------------------------
class FeatureKDStudent(TrainingWrapper):
    """A student plus the 1x1 projection, for training only, that maps its last feature map
    onto the teacher's channel count."""

    def __init__(self, student: nn.Module, student_ch=256, teacher_ch=512, layer="features"):
        super().__init__()
        self.student, self.layer = student, layer
        self.proj = nn.Conv2d(student_ch, teacher_ch, kernel_size=1)


def feature_targets(teacher, x, layer="layer4"):
    """The teacher's logits and the feature map of ``layer``, captured by a forward hook."""
    with capture(teacher, [layer]) as f:
        logits = teacher(x)
    return {"logits": logits, "map": f[layer]}


def match_maps(student_map: torch.Tensor, teacher_map: torch.Tensor):
    """Average-pool the larger of two feature maps to the other's spatial size."""
    hs, ht = student_map.shape[-2:], teacher_map.shape[-2:]
    if hs[0] * hs[1] > ht[0] * ht[1]:
        student_map = F.adaptive_avg_pool2d(student_map, ht)
    elif ht != hs:
        teacher_map = F.adaptive_avg_pool2d(teacher_map, hs)
    return student_map, teacher_map


def feature_kd_step(model, x, y, t, *, feature_weight=0.3):
    """R4's feature KD, shape-matched: ``(1 - w) * CE + w * MSE(proj(f^s), f^t)``.

    The student's map is captured by a forward hook on ``model.layer``, projected to the
    teacher's channels by a trained 1x1 convolution, and both maps are pooled to the same
    spatial size (:func:`match_maps`).
    """
    with capture(model.student, [model.layer]) as f:
        logits = model(x)
    s_map, t_map = match_maps(model.proj(f[model.layer]), t["map"])
    return {"ce": (1 - feature_weight) * ce_loss(logits, y),
            "feature": feature_weight * F.mse_loss(s_map, t_map.float())}


# ---- chapter 6: distillation when only some images have a label ----------------------------
def kd_unlabelled_step(model, x, y, t, *, T=5.0, alpha=0.5):
    """Per image, ``alpha * T^2 * KL(p^T || q^T)``, plus ``(1 - alpha) * CE`` where
    ``t["labelled"]`` is True; both terms are means over the whole batch, so a labelled image
    weighs the same whatever the number of labelled images its batch happens to hold."""
    s = model(x)
    hard = F.cross_entropy(s, y, reduction="none") * t["labelled"]
    return {"kd": alpha * soft_target_loss(s, t["logits"], T), "ce": (1 - alpha) * hard.mean()}


def pseudo_label_step(model, x, y, t):
    """Cross-entropy with each image's label where it has one, else with the teacher's top
    class (a hard pseudo-label): distillation that throws the soft targets' detail away."""
    s = model(x)
    has = t["labelled"]
    loss = F.cross_entropy(s, torch.where(has, y, t["logits"].argmax(1)), reduction="none")
    return {"ce": (loss * has).mean(), "pseudo": (loss * ~has).mean()}


# ---- the registry --------------------------------------------------------------------------
class Method(NamedTuple):
    """A student method: its loss ``step``, what the step needs from the teacher (``targets``,
    None without one), the wrapper that adds its training-only modules (``wrap(student,
    seed)``, None without any) and what the teacher sees (``teacher_sees``): the student's
    own augmented view (``"view"``) or, for inconsistent teaching, the unaugmented image."""

    step: Callable
    targets: Callable | None = None
    wrap: Callable[[nn.Module, int], nn.Module] | None = None
    teacher_sees: str = "view"

    @property
    def weights(self) -> dict:
        """The loss weights and their defaults, read from the step's signature: the one
        place they are written."""
        return step_defaults(self.step)


def step_defaults(step: Callable) -> dict:
    """A step's loss weights (its keyword-only arguments but ``progress``) and their defaults."""
    return {name: p.default for name, p in inspect.signature(step).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name != "progress"}


#: Every student method of the book by name.
#:
#: :meta hide-value:
METHODS = {
    "ce": Method(ce_step),
    "kd": Method(kd_step, kd_targets),
    "cosine": Method(cosine_step, cosine_targets),
    "hint": Method(hint_step, hint_targets, wrapped_in(HintStudent)),
    "dkd": Method(dkd_step, kd_targets),
    "kd_unlabelled": Method(kd_unlabelled_step, kd_targets),
    "pseudo_label": Method(pseudo_label_step, kd_targets),
    "kd_inconsistent": Method(kd_step, kd_targets, teacher_sees="image"),
    "byot": Method(byot_step),
    "hook_sd": Method(hook_sd_step, wrap=wrapped_in(HookSelfDistill)),
    # the projection's size depends on the teacher: the chapter builds FeatureKDStudent itself
    "feature_kd": Method(feature_kd_step, feature_targets),
}


def method_weights(method: str, weights: dict | None = None) -> dict:
    """``method``'s loss weights: its step's defaults with ``weights`` in place of some;
    refuses an unknown method or weight, naming what is known."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    known = METHODS[method].weights
    unknown = sorted(set(weights or {}) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} takes the weights {tuple(known)}, not {unknown}")
    return {**known, **(weights or {})}


def train_seeds(method: str, data, *, seeds, recipe: Recipe, chapter: str,
                student: str | Callable[[int], nn.Module] = "lightnn",
                teacher: Run | Teacher | None = None, weights: dict | None = None,
                speed: Speed = Speed(), select: str = "last",
                options: RunOptions = RunOptions()) -> list[Run]:
    """Train ``method`` (a name in :data:`METHODS`) once per seed in ``seeds`` by ``recipe``
    (its ``seed`` replaced by each), or reload the runs that are finished; one record each.

    ``student`` is a network name for :func:`kdutils.models.build` or ``seed -> network``;
    the method's wrapper, if any, is put around it. ``teacher`` is a teacher's run (its
    targets are the method's) or a :class:`~kdutils.loop.Teacher`. ``weights`` replaces some
    of the step's loss weights. Without augmentation the teacher's outputs are computed once,
    in the layout the runs use, and shared by all seeds; with it the teacher sees every batch.
    """
    weights = method_weights(method, weights)
    entry = METHODS[method]
    if (entry.targets is None) != (teacher is None):
        raise ValueError(f"method {method!r} {'needs a teacher' if teacher is None else 'takes no teacher'}")
    if isinstance(teacher, Run):
        teacher = Teacher(teacher.model, entry.targets, key=teacher.record["run_key"])
    # Without augmentation the first run that trains fills the teacher's table; the others
    # reuse it. With fixed views, or a layout the CPU chooser measures per run, each computes its own.
    if teacher is not None and teacher.outputs is None and not (recipe.augments or recipe.views or speed.measure):
        teacher = replace(teacher, outputs={})
    step = partial(entry.step, **weights) if weights else entry.step
    runs = []
    for seed in seeds:
        net = build(student, seed=seed) if isinstance(student, str) else student(seed)
        model = entry.wrap(net, seed) if entry.wrap is not None else net
        runs.append(fit(model, data, replace(recipe, seed=seed), chapter=chapter, method=method,
                        step=step, teacher=teacher, params=weights, speed=speed, select=select,
                        options=options))
    return runs


def seeded(build_fn, seed: int):
    """``build_fn()`` with the global RNG seeded by ``seed`` (and the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_fn()
