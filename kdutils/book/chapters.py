"""The book's chapters, each described once: one entry per chapter in :data:`CHAPTERS`.

An entry has the chapter's one name (its notebook ``book/NN_<name>.ipynb``, the ``chapter`` of
its run records and its recipe on the command line), its parameters with their checks and
defaults, what each profile changes, what it trains (its plan, for the edition's estimates)
and how to run it without the notebook (its runner). Every chapter's first code cell holds its
parameters (tagged ``parameters`` for papermill); the next one calls :func:`from_notebook`
(through :func:`kdutils.book.notebook.setup`), which

1. takes the profile from ``$KD_PROFILE`` if set (CI sets ``smoke``),
2. refuses unknown names, wrong types and impossible values before any training, with a
   message that names the parameter and what is allowed,
3. applies the profile (``smoke`` shrinks the run, ``full`` is the reference recipe).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import settings
from ..methods import METHODS, byot_step, hook_sd_step, step_defaults
from . import recipes
from .regimes import ARMS, VIEW_ARMS
from .params import (DATASETS, MODELS, PROFILES, SCHEDULES, ParameterError, Params, boolean,
                     choice, device, fraction, fractions, list_of, optional_path, positive_float,
                     positive_int, probability, seeds, weight)


@dataclass(frozen=True)
class Work:
    """``runs`` trainings of network ``arch`` (with network ``teacher``'s forward pass at each
    step, or None) over ``images`` images for ``epochs`` epochs, in batches of ``batch_size``;
    ``is_teacher``: this is the training of a chapter's teacher. After every epoch the run
    evaluates ``eval_images`` test images."""
    label: str
    arch: str
    images: int
    epochs: float
    runs: int = 1
    batch_size: int = 128
    teacher: str | None = None
    image_size: int = 32
    is_teacher: bool = False
    eval_images: int = 10_000


@dataclass(frozen=True)
class Chapter:
    """One chapter: its name, notebook, parameters (checker and default each), profiles, plan
    (``P -> [Work]``: what it trains) and runner (``P -> [Run]``: its recipe, teacher first)."""

    name: str
    notebook: str
    schema: dict[str, Callable]
    defaults: dict[str, Any]
    profiles: dict[str, dict] = field(default_factory=dict)
    plan: Callable[[Params], list[Work]] | None = None
    run: Callable[[Params], list] | None = None
    check: Callable[[Params], None] | None = None   # a rule across parameters

    def path(self, root: Path | None = None) -> Path:
        return Path(root or settings.project_root()) / "book" / f"{self.notebook}.ipynb"

    def accepts(self, profile: str) -> bool:
        """Whether the chapter runs in ``profile`` (a chapter without one runs in every one)."""
        if "profile" not in self.schema:
            return True
        try:
            self.schema["profile"](profile)
            return True
        except (TypeError, ValueError):
            return False


# ---- the parameters the chapters share --------------------------------------------------------
PART_ONE_PROFILES = ("full", "smoke")
COMMON = {"profile": choice(*PART_ONE_PROFILES), "dataset": choice(*DATASETS),
          "epochs": positive_int, "batch_size": positive_int, "lr": positive_float,
          "seeds": seeds, "device": device, "data_dir": optional_path, "ckpt_dir": optional_path,
          "results_dir": optional_path, "progress": boolean}
TEACHER = {"teacher": choice(*MODELS), "teacher_epochs": positive_int}
PART_TWO = {**COMMON, "profile": choice(*PROFILES, "auto"), "teacher_epochs": positive_int,
            "schedule": choice(*SCHEDULES), "amp": choice("auto", "bf16", "fp16", "off"),
            "channels_last": boolean, "compile": boolean}

# R5's recipe: Adam 1e-3, batch 128, 10 epochs, no augmentation; five seeds per method.
TUTORIAL_RECIPE = {"profile": "full", "dataset": "cifar10", "epochs": 10, "batch_size": 128,
                   "lr": 1e-3, "seeds": [0, 1, 2, 3, 4], "device": "auto", "data_dir": None,
                   "ckpt_dir": None, "results_dir": None, "progress": True, "teacher": "deepnn",
                   "teacher_epochs": 10}
# R1/R2's recipe: SGD 0.1 (momentum 0.9, weight decay 5e-4), batch 128, cosine over 200 epochs.
RESNET_RECIPE = {"profile": "auto", "dataset": "cifar10", "epochs": 200, "teacher_epochs": 200,
                 "batch_size": 128, "lr": 0.1, "schedule": "cosine", "seeds": [0, 1, 2],
                 "device": "auto", "amp": "auto", "channels_last": True, "compile": False,
                 "data_dir": None, "ckpt_dir": None, "results_dir": None, "progress": True}

# What a Part II profile sets (its values replace the parameters').
PART2_FAST = {"epochs": 30, "teacher_epochs": 30, "batch_size": 256, "lr": 0.2, "schedule": "onecycle"}
PART2_CPU = {"epochs": 3, "teacher_epochs": 4, "batch_size": 64, "lr": 0.05, "schedule": "onecycle"}
PART2_SMOKE = {"batch_size": 64, "lr": 0.05, "schedule": "onecycle", "max_seeds": 1,
               "train_size": 320, "test_size": 200}

_DATASET_SIZE = {"cifar10": 50_000, "stl10": 5_000, "imagenette": 9_469}


def _train_images(P) -> int:
    return P.get("train_size") or _DATASET_SIZE.get(P.get("dataset", "cifar10"), 50_000)


def _weights_not_both_zero(first: str):
    def rule(P):
        if P[first] + P.ce_weight == 0:
            raise ParameterError(f"parameters {first!r} and 'ce_weight' are both 0: "
                                 "at least one loss weight must be > 0")
    return rule


# ---- what each chapter trains (the edition's estimates count the main comparisons) ----------
def _part_one_plan(P) -> list[Work]:
    # R5's recipe does not augment: the teacher's outputs are computed once, not at every step
    n, seeds_ = _train_images(P), len(P.seeds)
    student = P.get("student", "lightnn")
    return [Work(f"{P.teacher} teacher", P.teacher, n, P.teacher_epochs, 1, P.batch_size, is_teacher=True),
            Work(f"{student} x{seeds_}", student, n, P.epochs, seeds_, P.batch_size)]


def _resnet_plan(P) -> list[Work]:
    n, s = _train_images(P), len(P.seeds)
    n_teacher = n if "teacher_train_size" not in P else (P.teacher_train_size or _DATASET_SIZE["cifar10"])
    return [Work("resnet50 teacher", "resnet50", n_teacher, P.teacher_epochs, 1, P.batch_size, is_teacher=True),
            Work(f"resnet18 ce x{s}", "resnet18", n, P.epochs, s, P.batch_size),
            Work(f"resnet18 kd x{s}", "resnet18", n, P.epochs, s, P.batch_size, "resnet50")]


def _selfdistill_plan(P) -> list[Work]:
    n, s = _train_images(P), len(P.seeds)
    return [Work(f"resnet18_multiexit byot x{2 * s}", "resnet18_multiexit", n, P.epochs, 2 * s, P.batch_size),
            Work(f"resnet18 ce and hooks x{3 * s}", "resnet18", n, P.epochs, 3 * s, P.batch_size)]


def _pretrained_plan(P) -> list[Work]:   # the KD students' teacher outputs are computed once
    s = len(P.seeds)
    return [Work(f"smallcnn x{3 * s}", "smallcnn", _train_images(P), P.epochs, 3 * s,
                 P.batch_size, None, P.image_size)]


def _pays_plan(P) -> list[Work]:   # its four experiments; every run but the views' fills 50,000 images
    n, s, bs = _train_images(P), len(P.seeds), P.batch_size
    few = [f for f in P.fractions if f < 1]
    teachers = len(P.teacher_seeds) + 1            # and one without label smoothing
    return [Work(f"airbench teacher x{teachers}", "airbench", n, P.teacher_epochs, teachers, 1024,
                 is_teacher=True),
            Work(f"lightnn, teacher strength x{(2 + teachers) * s}", "lightnn", n, P.epochs,
                 (2 + teachers) * s, bs),
            Work("lightnn, few labels", "lightnn", n, P.few_label_epochs,
                 (len(ARMS) * len(few) + 2 * (len(few) < len(P.fractions))) * s, bs),
            Work("lightnn, T x alpha", "lightnn", n - P.grid_val_size, P.few_label_epochs,
                 (len(P.grid_T) * len(P.grid_alpha) + 1) * s, bs),
            Work("lightnn, fixed views", "lightnn", int(n * P.view_fraction), sum(P.view_epochs),
                 len(VIEW_ARMS) * s, bs)]


def _fast_plan(P) -> list[Work]:   # each network twice per seed: fp32 NCHW and the fast setting
    s = len(P.seeds)
    return [Work(f"{m} x{s}", m, _train_images(P), P.epochs, 2 * s, P.batch_size) for m in P.students]


def _scale_out_plan(P) -> list[Work]:
    return [Work("lightnn, 1 and several processes", "lightnn", _train_images(P), P.epochs, 2, P.batch_size)]


def _self_distillation_run(P) -> list:
    return recipes.selfdistill(P, check("resnet50_to_resnet18", **{
        k: P[k] for k in settings.RUN_OPTIONS + ("data_dir",)}))


# ---- the registry ----------------------------------------------------------------------------
#: Every chapter of the book by name, in the table of contents' order.
#:
#: :meta hide-value:
CHAPTERS: dict[str, Chapter] = {c.name: c for c in [
    Chapter("introduction", "01_introduction",
            {"profile": COMMON["profile"], "dataset": COMMON["dataset"], "data_dir": optional_path},
            {"profile": "full", "dataset": "cifar10", "data_dir": None}),
    Chapter("baseline", "02_baseline", {**COMMON, **TEACHER, "student": choice(*MODELS)},
            {**TUTORIAL_RECIPE, "student": "lightnn"},
            plan=_part_one_plan, run=lambda P: recipes.part_one("baseline", "ce", P)),
    Chapter("hinton_kd", "03_hinton_kd",
            {**COMMON, **TEACHER, "student": choice(*MODELS), "T": positive_float, "alpha": probability},
            {**TUTORIAL_RECIPE, "student": "lightnn", **METHODS["kd"].weights},
            plan=_part_one_plan, run=lambda P: recipes.part_one("hinton_kd", "kd", P)),
    Chapter("cosine_hidden_state", "04_cosine_hidden_state",
            {**COMMON, **TEACHER, "hidden_weight": weight, "ce_weight": weight},
            {**TUTORIAL_RECIPE, **METHODS["cosine"].weights}, plan=_part_one_plan,
            run=lambda P: recipes.part_one("cosine_hidden_state", "cosine", P),
            check=_weights_not_both_zero("hidden_weight")),
    Chapter("intermediate_regressor", "05_intermediate_regressor",
            {**COMMON, **TEACHER, "hint_weight": weight, "ce_weight": weight},
            {**TUTORIAL_RECIPE, **METHODS["hint"].weights}, plan=_part_one_plan,
            run=lambda P: recipes.part_one("intermediate_regressor", "hint", P),
            check=_weights_not_both_zero("hint_weight")),
    # The airbench teacher (9.9 epochs), then R5's student recipe with chapter 3's T and alpha,
    # five seeds; the few-label runs take 3 epochs' worth of steps.
    Chapter("when_distillation_pays", "06_when_distillation_pays",
            {**COMMON, "teacher_epochs": positive_float, "T": positive_float, "alpha": probability,
             "fractions": fractions, "few_label_epochs": positive_int,
             "grid_T": list_of(positive_float), "grid_alpha": list_of(probability),
             "grid_fraction": fraction, "grid_val_size": positive_int, "teacher_seeds": seeds,
             "view_fraction": fraction, "views": positive_int, "view_epochs": list_of(positive_int)},
            {**{k: v for k, v in TUTORIAL_RECIPE.items() if k != "teacher"}, "teacher_epochs": 9.9,
             "T": 5.0, "alpha": 0.5, "fractions": [0.01, 0.05, 0.2, 1.0], "few_label_epochs": 3,
             "grid_T": [1.0, 2.0, 5.0, 10.0], "grid_alpha": [0.25, 0.5, 0.9], "grid_fraction": 0.05,
             "grid_val_size": 5000, "teacher_seeds": [0, 1], "view_fraction": 0.2, "views": 8,
             "view_epochs": [10, 40]},
            {"smoke": {"few_label_epochs": 1, "fractions": [0.05, 1.0], "grid_T": [1.0, 5.0],
                       "grid_alpha": [0.5], "grid_val_size": 200, "views": 2, "view_epochs": [1, 2]}},
            plan=_pays_plan),
    Chapter("results", "07_results", {"results_dir": optional_path}, {"results_dir": None}),
    # The cpu profile's ResNet50 learns from all 50,000 training images for one epoch: on a
    # tenth of them it stayed below the ResNet18 it was to teach. Students: a tenth, 3 seeds.
    Chapter("resnet50_to_resnet18", "08_resnet50_to_resnet18",
            {**PART_TWO, "T": positive_float, "alpha": probability},
            {**RESNET_RECIPE, "T": 3.0, "alpha": 0.5},
            {"fast": PART2_FAST, "cpu": {**PART2_CPU, "teacher_epochs": 1, "teacher_train_size": None,
                                         "test_size": None, "max_seeds": 3},
             "smoke": PART2_SMOKE},
            plan=_resnet_plan, run=recipes.resnet_kd),
    # Chapter 8's students' recipe, seeds and images, so that its plain ResNet18 runs are shared.
    Chapter("self_distillation", "09_self_distillation",
            {**PART_TWO, "T": positive_float, "kd_weight": weight, "feature_weight": weight,
             "detach_teacher": boolean, "autoaugment": boolean, "erasing": probability,
             "hook_weight": probability, "val_size": positive_int},
            {**RESNET_RECIPE, **step_defaults(byot_step), "autoaugment": True, "erasing": 0.5,
             **step_defaults(hook_sd_step), "val_size": 5000},
            {"fast": PART2_FAST, "cpu": {**PART2_CPU, "autoaugment": False, "erasing": 0.0,
                                         "val_size": 500, "test_size": None, "max_seeds": 3},
             "smoke": {**PART2_SMOKE, "val_size": 200}},
            plan=_selfdistill_plan, run=_self_distillation_run),
    # R4: STL10 at 224 px, an ImageNet-pretrained teacher whose head is trained 5 epochs, the
    # student 10 epochs with Adam 1e-3, batch 64. Without a GPU (and in CI, offline) the
    # chapter runs on CIFAR-10 at its own 32 px: R4's student recipe on a tenth of the images.
    Chapter("pretrained_teacher", "10_pretrained_teacher",
            {**PART_TWO, "dataset": choice("cifar10", "stl10", "imagenette"),
             "teacher_weights": choice("imagenet", "none"), "image_size": positive_int,
             "T": positive_float, "alpha": probability, "feature_weight": probability},
            {**RESNET_RECIPE, "dataset": "stl10", "teacher_weights": "imagenet", "image_size": 224,
             "epochs": 10, "teacher_epochs": 5, "batch_size": 64, "lr": 1e-3,
             "schedule": "constant", "seeds": [0, 1, 2], "T": 2.0, "alpha": 0.7, "feature_weight": 0.3},
            {"fast": {}, "cpu": {"teacher_epochs": 3, "dataset": "cifar10", "image_size": 32,
                                 "test_size": None, "max_seeds": 3},
             "smoke": {"dataset": "cifar10", "image_size": 32, "max_seeds": 1, "train_size": 320,
                       "test_size": 200}},
            plan=_pretrained_plan, run=recipes.pretrained),
    # R5's student recipe, fp32 NCHW against the fast settings, for both of Part I's networks.
    Chapter("appendix_fast", "appendix_fast", {**COMMON, "students": list_of(choice(*MODELS))},
            {**{k: v for k, v in TUTORIAL_RECIPE.items() if k not in TEACHER},
             "students": ["lightnn", "deepnn"]}, plan=_fast_plan),
    # 1 process against several, on a subset.
    Chapter("appendix_scale_out", "appendix_scale_out",
            {"profile": COMMON["profile"], "dataset": COMMON["dataset"], "epochs": positive_int,
             "batch_size": positive_int, "processes": positive_int, "train_size": positive_int,
             "data_dir": optional_path},
            {"profile": "full", "dataset": "cifar10", "epochs": 3, "batch_size": 64,
             "processes": 2, "train_size": 4000, "data_dir": None}, plan=_scale_out_plan),
]}

# Names an IPython namespace holds besides the parameters.
_NOTEBOOK_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
_LITERALS = (str, int, float, bool, list, tuple, dict, type(None))


def chapter(name: str) -> Chapter:
    """The chapter called ``name``, or an error naming the known ones."""
    if name not in CHAPTERS:
        raise ParameterError(f"unknown chapter {name!r}; known: {', '.join(CHAPTERS)}")
    return CHAPTERS[name]


def check(name: str, **values: Any) -> Params:
    """Validate ``values`` against chapter ``name``'s parameters and apply the profile.

    Raises :class:`~kdutils.book.params.ParameterError` naming the first bad parameter and
    what is allowed.
    """
    ch = chapter(name)
    unknown = sorted(set(values) - set(ch.schema))
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for chapter {name!r}; "
            f"allowed: {', '.join(ch.schema)}")
    merged = {**ch.defaults, **values}
    forced = settings.profile_override()
    if forced is not None and "profile" in ch.schema:
        merged["profile"] = forced
    out = Params()
    for key, checker in ch.schema.items():
        try:
            out[key] = checker(merged[key])
        except (TypeError, ValueError) as e:
            source = f" (from ${settings.PROFILE_VAR})" if key == "profile" and forced else ""
            raise ParameterError(f"parameter {key!r} = {merged[key]!r}{source} is not allowed: "
                                 f"it must be {e}") from None
    if ch.check is not None:
        ch.check(out)
    if out.get("profile") == "auto":
        out["profile"] = auto_profile(out.device)
    return _apply_profile(out, ch)


def auto_profile(device: str) -> str:
    """What a Part II chapter's ``profile = "auto"`` runs: ``fast`` where the chapter's device is
    a CUDA GPU (``"auto"`` finds one, or one is named), ``cpu`` elsewhere."""
    import torch
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return "fast" if gpu else "cpu"


def _apply_profile(p: Params, ch: Chapter) -> Params:
    if "profile" not in p:  # a chapter that trains nothing (the results chapter)
        return p
    prof = {**PROFILES[p.profile], **ch.profiles.get(p.profile, {})}
    for name in ("train_size", "test_size"):  # None: the whole split
        if name in prof or name not in p:  # a chapter may also take them as parameters
            p[name] = prof.get(name)
    for name, value in prof.items():
        if name in p:
            p[name] = value
    if "teacher_train_size" in prof:  # the teacher may learn from more images than its students
        p["teacher_train_size"] = prof["teacher_train_size"]
    if "seeds" in p and "max_seeds" in prof:
        p["seeds"] = p.seeds[: prof["max_seeds"]]
    return p


def from_notebook(namespace: dict[str, Any], chapter: str) -> Params:
    """Check the parameters a notebook defined (its ``globals()``), papermill's included.

    Every plain value (str, number, bool, list, dict, None) whose name does not start with
    ``_`` counts as a parameter, so a misspelt papermill ``-p`` name is caught here.
    """
    values = {k: v for k, v in namespace.items()
              if not k.startswith("_") and k not in _NOTEBOOK_NAMES and isinstance(v, _LITERALS)}
    return check(chapter, **values)


def plan(name: str, P: Params) -> list[Work]:
    """What chapter ``name`` trains with checked parameters ``P`` (its main comparisons),
    each work evaluating the chapter's test images after every epoch."""
    ch = chapter(name)
    if ch.plan is None or "epochs" not in P:
        return []
    tests = P.get("test_size") or {"stl10": 8_000, "imagenette": 3_925}.get(P.get("dataset"), 10_000)
    return [Work(**{**w.__dict__, "eval_images": tests}) for w in ch.plan(P)]
