"""The kinds of chapter parameters and their checks, and the profiles (chapter 1).

A checker takes a value and returns it normalised, or raises ``TypeError``/``ValueError``
whose message says what is allowed ("an integer >= 1"). :mod:`kdutils.book.chapters` gives
every chapter's parameters one checker each.
"""
from __future__ import annotations

import math
from typing import Any, Callable


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
