"""The Part I methods: what each needs from the teacher, and its training step (chapters 2-5).

A method is two small functions: ``*_targets(teacher, x) -> dict`` (what the loss needs from
the frozen teacher) and ``*_step(model, x, y, t) -> loss``. The chapters display them with
:func:`kdutils.show_code`; :func:`train_seeds` trains a method over several seeds with the one loop.
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
from .losses import byot_loss, ce_loss, cosine_terms, hint_terms, kd_terms, pool_to_dim
from .models import build
from .speed import Speed
from .loop import ce_step  # noqa: F401 (chapter 2's step, listed in METHODS)
from .train import Recipe, Run, fit

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


def _hint_model(seed):
    student = build("lightnn", seed=seed)  # the same initial student as every other method
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return HintStudent(student)


class Method(NamedTuple):
    """A Part I method: its home chapter, its loss ``step``, what the step needs from the
    teacher (``targets``, None without one) and how its student is built from a seed."""

    chapter: str
    step: Callable
    targets: Callable | None
    make: Callable[[int], nn.Module]

    @property
    def weights(self) -> dict:
        """The loss weights and their defaults (R5's), read from the step's signature: the
        one place they are written."""
        return step_defaults(self.step)


def step_defaults(step: Callable) -> dict:
    """A step's loss weights (its keyword-only arguments) and their defaults."""
    return {name: p.default for name, p in inspect.signature(step).parameters.items()
            if p.kind is p.KEYWORD_ONLY}


def _lightnn(seed: int) -> nn.Module:
    return build("lightnn", seed=seed)


METHODS = {
    "ce": Method("baseline", ce_step, None, _lightnn),
    "kd": Method("hinton", kd_step, kd_targets, _lightnn),
    "cosine": Method("cosine", cosine_step, cosine_targets, _lightnn),
    "hint": Method("regressor", hint_step, hint_targets, _hint_model),
}


def train_seeds(method: str, data, *, seeds, recipe: Recipe, teacher: Run | None = None,
                make: Callable[[int], nn.Module] | None = None, step: Callable | None = None,
                targets: Callable | None = None, chapter: str | None = None,
                weights: dict | None = None, speed: Speed = Speed(), select: str = "last",
                profile="full", device="auto", ckpt_dir=None, results_dir=None,
                progress=True) -> list[Run]:
    """Train ``method``'s student once per seed in ``seeds`` by ``recipe`` (its ``seed``
    replaced by each), or reload the runs that are finished; one record each.

    A method of :data:`METHODS` brings its step, teacher targets, student and home chapter
    (``make`` and ``chapter`` may be overridden: Part II trains ``ce`` and ``kd`` on ResNets),
    and its loss weights default to the step's; ``weights`` sets some of them. Any other
    method names its ``make``, ``step`` and ``chapter`` (and ``targets`` with a teacher), and
    ``weights`` are its step's keyword arguments as recorded. Without augmentation the
    teacher's outputs are computed once, in the memory layout the runs use, and shared by
    all seeds (exact: an image is the same tensor every epoch); with it the teacher runs on
    every batch. (With fixed views, or a layout the CPU chooser measures per run, each run
    computes its own table.)
    """
    weights = dict(weights or {})
    entry = METHODS.get(method)
    if entry is not None:
        if step not in (None, entry.step):
            raise ValueError(f"method {method!r} is registered with {entry.step.__name__}: "
                             "give another step under another name")
        if targets not in (None, entry.targets):
            raise ValueError(f"method {method!r} is registered with the teacher targets "
                             f"{getattr(entry.targets, '__name__', None)}: give other targets "
                             "under another name")
        if entry.targets is None and teacher is not None:
            raise ValueError(f"method {method!r} takes no teacher")
        unknown = set(weights) - set(entry.weights)
        if unknown:
            raise ValueError(f"method {method!r} takes the weights {tuple(entry.weights)}, "
                             f"not {sorted(unknown)}")
        weights = {**entry.weights, **weights}
        step, targets = entry.step, entry.targets
        make, chapter = make or entry.make, chapter or entry.chapter
    elif make is None or step is None or chapter is None:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)} (any other "
                         "method needs make, step and chapter)")
    if targets is not None and teacher is None:
        raise ValueError(f"method {method!r} needs a teacher")
    if teacher is not None and targets is None:
        raise ValueError(f"method {method!r} was given a teacher but no targets (what its step needs from it)")
    step_fn = partial(step, **weights) if weights else step
    options = dict(chapter=chapter, method=method, step=step_fn, params=weights, speed=speed,
                   select=select, profile=profile, device=device, ckpt_dir=ckpt_dir,
                   results_dir=results_dir, progress=progress)
    if teacher is not None:
        options.update(teacher=teacher.model, teacher_targets=targets,
                       teacher_key=teacher.record["run_key"])
    # Without augmentation the first run that trains fills the teacher's table; the others
    # reuse it. With fixed views, or a layout the CPU chooser measures per run, each run
    # computes its own.
    shared = {} if teacher is not None and not (recipe.augments or recipe.views or speed.measure) else None
    return [fit(make(seed), data, replace(recipe, seed=seed), teacher_outputs=shared, **options)
            for seed in seeds]


# ---- Part II: self-distillation across exits (R1) -----------------------------------------
def byot_step(model, x, y, t, *, T=4.0, kd_weight=0.7, feature_weight=0.3, detach_teacher=False):
    """R1's loss on a multi-exit network: every exit learns the labels, the shallow exits
    also the deepest exit's soft predictions and (detached) feature map."""
    logits, feats = model(x)
    return byot_loss(logits, feats, y, T=T, kd_weight=kd_weight, feature_weight=feature_weight,
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
    return (hook_weight * F.mse_loss(model.proj(shallow), deep)
            + (1 - hook_weight) * ce_loss(logits, y))


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
    return (1 - feature_weight) * ce_loss(logits, y) + feature_weight * F.mse_loss(s_map, t_map.float())


def seeded(build_fn, seed: int):
    """``build_fn()`` with the global RNG seeded by ``seed`` (and the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_fn()
