"""Chapter parameters: defaults, profiles and validation (introduced in chapter 1).

Every chapter's first code cell holds its parameters (tagged ``parameters`` for papermill).
The next cell calls :func:`from_notebook` (through :func:`kdutils.notebook.setup` in the
chapters that load one dataset), which

1. takes the profile from ``$KD_PROFILE`` if set (CI sets ``smoke``),
2. refuses unknown names, wrong types and impossible values before any training, with a
   message that names the parameter and what is allowed,
3. applies the profile (``smoke`` shrinks the run, ``full`` is the reference recipe).
"""
from __future__ import annotations

import math
from typing import Any, Callable

from . import settings
from .methods import METHODS, byot_step, hook_sd_step, step_defaults  # loss weights: the steps' defaults

PROFILES: dict[str, dict[str, Any]] = {
    # Real recipe: every image, the chapter's own epochs and seeds.
    "full": {},
    # CI: a few thousand images and one epoch, so a chapter runs in well under 2 minutes on
    # 2 CPU cores. Its numbers mean nothing and are never published.
    "smoke": {"epochs": 1, "teacher_epochs": 1, "max_seeds": 2,
              "train_size": 2000, "test_size": 1000},
    # Part II only (see CHAPTER_PROFILES): a short one-cycle recipe for a GPU, and a reduced but
    # real training for a machine without one.
    "fast": {},
    "cpu": {"max_seeds": 1, "train_size": 5000, "test_size": 1000},
}
PART_ONE_PROFILES = ("full", "smoke")

# What a profile sets in a given chapter, beyond PROFILES (its values replace the parameters').
PART2_FAST = {"epochs": 30, "teacher_epochs": 30, "batch_size": 256, "lr": 0.2, "schedule": "onecycle"}
PART2_CPU = {"epochs": 3, "teacher_epochs": 4, "batch_size": 64, "lr": 0.05, "schedule": "onecycle"}
PART2_SMOKE = {"batch_size": 64, "lr": 0.05, "schedule": "onecycle", "max_seeds": 1,
           "train_size": 320, "test_size": 200}
CHAPTER_PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # The cpu profile's ResNet50 learns from all 50,000 training images for one epoch: on a
    # tenth of them it stayed below the ResNet18 it was to teach. Students: a tenth, 3 seeds.
    "resnet": {"fast": PART2_FAST, "cpu": {**PART2_CPU, "teacher_epochs": 1, "teacher_train_size": None,
                                           "test_size": None, "max_seeds": 3},
               "smoke": PART2_SMOKE},
    # Chapter 8's students' recipe, seeds and images, so that its plain ResNet18 runs are shared.
    "selfdistill": {"fast": PART2_FAST, "cpu": {**PART2_CPU, "autoaugment": False, "erasing": 0.0,
                                           "val_size": 500, "test_size": None, "max_seeds": 3},
                    "smoke": {**PART2_SMOKE, "val_size": 200}},
    # Without a GPU (and in CI, offline) the chapter runs on CIFAR-10 at its own 32 px: the
    # cpu profile is R4's student recipe on a tenth of the training images, every test image.
    "pretrained": {"fast": {}, "cpu": {"teacher_epochs": 3, "dataset": "cifar10", "image_size": 32,
                                       "test_size": None, "max_seeds": 3},
                   "smoke": {"dataset": "cifar10", "image_size": 32, "max_seeds": 1, "train_size": 320,
                             "test_size": 200}},
    "pays": {"smoke": {"few_label_epochs": 1, "fractions": [0.05, 1.0], "grid_T": [1.0, 5.0],
                       "grid_alpha": [0.5], "views": 2, "view_epochs": [1, 2]}},
}

DEVICES = ("auto", "cpu", "cuda", "mps")
DATASETS = ("cifar10",)
MODELS = ("deepnn", "lightnn")
SCHEDULES = ("constant", "cosine", "onecycle")


class ParameterError(ValueError):
    """A chapter parameter is unknown, of the wrong type, or has an impossible value."""


class Params(dict):
    """A dict of checked parameters that also reads as attributes (``P.epochs``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ---- one checker per kind of value: (value) -> normalised value, or raise with "allowed" ----

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def positive_int(v):
    if not _is_int(v):
        raise TypeError("an integer >= 1")
    if v < 1:
        raise ValueError("an integer >= 1")
    return v


def positive_float(v):
    if not _is_number(v):
        raise TypeError("a number > 0")
    if not math.isfinite(v) or v <= 0:
        raise ValueError("a number > 0")
    return float(v)


def probability(v):
    if not _is_number(v):
        raise TypeError("a number in [0, 1]")
    if not 0 <= v <= 1:
        raise ValueError("a number in [0, 1]")
    return float(v)


def weight(v):
    if not _is_number(v):
        raise TypeError("a number >= 0")
    if not math.isfinite(v) or v < 0:
        raise ValueError("a number >= 0")
    return float(v)


def seeds(v):
    allowed = "a non-negative integer or a non-empty list of them"
    if _is_int(v):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(_is_int(s) for s in v):
        raise TypeError(allowed)
    if not v or any(s < 0 for s in v):
        raise ValueError(allowed)
    if len(set(v)) != len(v):
        raise ValueError(allowed + ", without repeats")
    return list(v)


def fractions(v):
    allowed = "a non-empty list of numbers in (0, 1]"
    if not isinstance(v, (list, tuple)) or not all(_is_number(f) for f in v):
        raise TypeError(allowed)
    if not v or any(not 0 < f <= 1 for f in v):
        raise ValueError(allowed)
    return [float(f) for f in v]


def fraction(v):
    if not _is_number(v):
        raise TypeError("a number in (0, 1]")
    if not 0 < v <= 1:
        raise ValueError("a number in (0, 1]")
    return float(v)


def list_of(item: Callable[[Any], Any]) -> Callable[[Any], list]:
    """A checker for a non-empty list whose every element passes ``item``."""
    def check(v):
        try:
            item(None)
        except (TypeError, ValueError) as e:
            allowed = f"a non-empty list, each {e}"
        if not isinstance(v, (list, tuple)) or not v:
            raise TypeError(allowed)
        try:
            return [item(x) for x in v]
        except TypeError:
            raise TypeError(allowed) from None
        except ValueError:
            raise ValueError(allowed) from None
    return check


def optional_path(v):
    if v is not None and not isinstance(v, str):
        raise TypeError("a folder path (str) or None")
    return v


def boolean(v):
    if not isinstance(v, bool):
        raise TypeError("True or False")
    return v


def choice(*options: str) -> Callable[[Any], str]:
    def check(v):
        allowed = "one of " + ", ".join(repr(o) for o in options)
        if not isinstance(v, str):
            raise TypeError(allowed)
        if v not in options:
            raise ValueError(allowed)
        return v
    check.options = options
    return check


def device(v):
    allowed = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
    if not isinstance(v, str):
        raise TypeError(allowed)
    if v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise ValueError(allowed)


def literal(text: str) -> Any:
    """A parameter value typed on a command line: a Python literal (``0.5``, ``[0, 1]``,
    ``None``), else the word itself (``cpu``, ``onecycle``)."""
    import ast
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# ---- the parameters of each chapter ----

COMMON: dict[str, Callable] = {
    "profile": choice(*PART_ONE_PROFILES),
    "dataset": choice(*DATASETS),
    "epochs": positive_int,
    "batch_size": positive_int,
    "lr": positive_float,
    "seeds": seeds,
    "device": device,
    "data_dir": optional_path,
    "ckpt_dir": optional_path,
    "results_dir": optional_path,
    "progress": boolean,
}
TEACHER = {"teacher": choice(*MODELS), "teacher_epochs": positive_int}
# Part II: SGD recipes on ResNets, the fast path's switches.
PART2_SCHEMA = {**COMMON, "profile": choice(*PROFILES), "teacher_epochs": positive_int,
         "schedule": choice(*SCHEDULES), "amp": choice("auto", "bf16", "fp16", "off"),
         "channels_last": boolean, "compile": boolean}

SCHEMAS: dict[str, dict[str, Callable]] = {
    "introduction": {"profile": COMMON["profile"], "dataset": COMMON["dataset"],
                     "data_dir": optional_path},
    "baseline": {**COMMON, **TEACHER, "student": choice(*MODELS)},
    "hinton": {**COMMON, **TEACHER, "student": choice(*MODELS),
               "T": positive_float, "alpha": probability},
    "cosine": {**COMMON, **TEACHER, "hidden_weight": weight, "ce_weight": weight},
    "regressor": {**COMMON, **TEACHER, "hint_weight": weight, "ce_weight": weight},
    "resnet": {**PART2_SCHEMA, "T": positive_float, "alpha": probability},
    "selfdistill": {**PART2_SCHEMA, "T": positive_float, "kd_weight": weight,
                    "feature_weight": weight, "detach_teacher": boolean,
                    "autoaugment": boolean, "erasing": probability,
                    "hook_weight": probability, "val_size": positive_int},
    "pretrained": {**PART2_SCHEMA, "dataset": choice("cifar10", "stl10", "imagenette"),
                   "teacher_weights": choice("imagenet", "none"), "image_size": positive_int,
                   "T": positive_float, "alpha": probability, "feature_weight": probability},
    "pays": {**COMMON, "teacher_epochs": positive_float, "T": positive_float,
             "alpha": probability, "fractions": fractions, "few_label_epochs": positive_int,
             "grid_T": list_of(positive_float), "grid_alpha": list_of(probability),
             "grid_fraction": fraction, "view_fraction": fraction, "views": positive_int,
             "view_epochs": list_of(positive_int)},
    "results": {"results_dir": optional_path},
    "speed": {**COMMON, "students": list_of(choice(*MODELS))},
    "scaleout": {"profile": COMMON["profile"], "dataset": COMMON["dataset"], "epochs": positive_int,
                 "batch_size": positive_int, "processes": positive_int, "train_size": positive_int,
                 "data_dir": optional_path},
}

# R5's recipe: Adam 1e-3, batch 128, 10 epochs, no augmentation; five seeds per method.
TUTORIAL_RECIPE = {"profile": "full", "dataset": "cifar10", "epochs": 10, "batch_size": 128, "lr": 1e-3,
       "seeds": [0, 1, 2, 3, 4], "device": "auto", "data_dir": None, "ckpt_dir": None,
       "results_dir": None, "progress": True, "teacher": "deepnn", "teacher_epochs": 10}

# R1/R2's recipe: SGD 0.1 (momentum 0.9, weight decay 5e-4), batch 128, cosine over 200 epochs.
RESNET_RECIPE = {"profile": "full", "dataset": "cifar10", "epochs": 200, "teacher_epochs": 200,
       "batch_size": 128, "lr": 0.1, "schedule": "cosine", "seeds": [0, 1, 2], "device": "auto",
       "amp": "auto", "channels_last": True, "compile": False, "data_dir": None,
       "ckpt_dir": None, "results_dir": None, "progress": True}

DEFAULTS: dict[str, dict[str, Any]] = {
    "introduction": {"profile": "full", "dataset": "cifar10", "data_dir": None},
    "baseline": {**TUTORIAL_RECIPE, "student": "lightnn"},
    "hinton": {**TUTORIAL_RECIPE, "student": "lightnn", **METHODS["kd"].weights},
    "cosine": {**TUTORIAL_RECIPE, **METHODS["cosine"].weights},
    "regressor": {**TUTORIAL_RECIPE, **METHODS["hint"].weights},
    "resnet": {**RESNET_RECIPE, "T": 3.0, "alpha": 0.5},
    "selfdistill": {**RESNET_RECIPE, **step_defaults(byot_step), "autoaugment": True, "erasing": 0.5,
                    **step_defaults(hook_sd_step), "val_size": 5000},
    # R4: STL10 at 224 px, an ImageNet-pretrained teacher whose head is trained 5 epochs,
    # the student 10 epochs with Adam 1e-3, batch 64.
    "pretrained": {**RESNET_RECIPE, "dataset": "stl10", "teacher_weights": "imagenet", "image_size": 224,
                   "epochs": 10, "teacher_epochs": 5, "batch_size": 64, "lr": 1e-3,
                   "schedule": "constant", "seeds": [0, 1, 2], "T": 2.0, "alpha": 0.7,
                   "feature_weight": 0.3},
    # When distillation pays: the airbench teacher (9.9 epochs), then R5's student recipe with
    # chapter 3's T and alpha, five seeds; the few-label runs take 3 epochs' worth of steps.
    "pays": {**{k: v for k, v in TUTORIAL_RECIPE.items() if k != "teacher"}, "teacher_epochs": 9.9, "T": 5.0, "alpha": 0.5,
             "fractions": [0.01, 0.05, 0.2, 1.0], "few_label_epochs": 3,
             "grid_T": [1.0, 2.0, 5.0, 10.0], "grid_alpha": [0.25, 0.5, 0.9], "grid_fraction": 0.05,
             "view_fraction": 0.2, "views": 8, "view_epochs": [10, 40]},
    "results": {"results_dir": None},
    # Appendix "Making it fast": R5's student recipe, fp32 NCHW against the fast settings, for
    # both of Part I's networks.
    "speed": {**TUTORIAL_RECIPE, "students": ["lightnn", "deepnn"]},
    # Appendix "Scale-out": 1 process against several, on a subset.
    "scaleout": {"profile": "full", "dataset": "cifar10", "epochs": 3, "batch_size": 64,
                 "processes": 2, "train_size": 4000, "data_dir": None},
}

# Names an IPython namespace holds besides the parameters.
_NOTEBOOK_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
_LITERALS = (str, int, float, bool, list, tuple, dict, type(None))


def check(chapter: str, **values: Any) -> Params:
    """Validate ``values`` against ``chapter``'s parameters and apply the profile.

    Raises :class:`ParameterError` naming the first bad parameter and what is allowed.
    """
    if chapter not in SCHEMAS:
        raise ParameterError(f"unknown chapter {chapter!r}; known: {', '.join(SCHEMAS)}")
    schema = SCHEMAS[chapter]
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for chapter {chapter!r}; "
            f"allowed: {', '.join(schema)}")
    merged = {**DEFAULTS[chapter], **values}
    forced = settings.profile_override()
    if forced is not None:
        merged["profile"] = forced
    out = Params()
    for name, checker in schema.items():
        value = merged[name]
        try:
            out[name] = checker(value)
        except (TypeError, ValueError) as e:
            source = f" (from ${settings.PROFILE_VAR})" if name == "profile" and forced else ""
            raise ParameterError(
                f"parameter {name!r} = {value!r}{source} is not allowed: it must be {e}") from None
    if "hidden_weight" in out and out.hidden_weight + out.ce_weight == 0:
        raise ParameterError("parameters 'hidden_weight' and 'ce_weight' are both 0: "
                             "at least one loss weight must be > 0")
    if "hint_weight" in out and out.hint_weight + out.ce_weight == 0:
        raise ParameterError("parameters 'hint_weight' and 'ce_weight' are both 0: "
                             "at least one loss weight must be > 0")
    return _apply_profile(out, chapter)


def _apply_profile(p: Params, chapter: str) -> Params:
    if "profile" not in p:  # a chapter that trains nothing (the results chapter)
        return p
    prof = {**PROFILES[p.profile], **CHAPTER_PROFILES.get(chapter, {}).get(p.profile, {})}
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
              if not k.startswith("_") and k not in _NOTEBOOK_NAMES
              and isinstance(v, _LITERALS)}
    return check(chapter, **values)


PROFILE_NOTES = {
    "full": "This is the chapter's full recipe.",
    "fast": "This is the short one-cycle recipe, not the 200-epoch one.",
    "cpu": ("This is a reduced but real training, made on a machine without a GPU: a few "
            "epochs on a tenth of CIFAR-10. Its accuracies are far below what the full recipe "
            "reaches and say nothing about it; they show the method working end to end."),
    "smoke": "This is a code check only; its numbers mean nothing.",
}


def profile_note(profile: str) -> str:
    """The sentence a Part II page shows under its run's description: what its profile's
    numbers can and cannot say."""
    return PROFILE_NOTES[profile]


def describe(p: Params) -> str:
    """One line saying what produced a result: profile, epochs, seeds, data sizes."""
    bits = [f"profile={p.profile}"]
    if "epochs" in p:
        bits.append(f"epochs={p.epochs}")
    if "seeds" in p:
        bits.append(f"seeds={p.seeds}")
    if p.get("train_size"):
        bits.append(f"train_size={p.train_size}")
    return ", ".join(bits)
