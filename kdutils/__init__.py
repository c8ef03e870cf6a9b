"""kdutils: the shared code of the book *Knowledge Distillation in PyTorch*.

One module per concern: :mod:`~kdutils.settings` (environment, paths), :mod:`~kdutils.params`
(chapter parameters, profiles, validation), :mod:`~kdutils.data` (datasets as tensors,
batched augmentation), :mod:`~kdutils.autoaugment` (AutoAugment on whole batches), :mod:`~kdutils.models`, :mod:`~kdutils.losses`,
:mod:`~kdutils.loop` (one epoch of training, evaluation), :mod:`~kdutils.train` (``fit``: a
whole run around the loop), :mod:`~kdutils.runs` (a run's key, checkpoint and record),
:mod:`~kdutils.fingerprint` (what code a run ran),
:mod:`~kdutils.speed` (precision and layout per machine), :mod:`~kdutils.checkpoint`,
:mod:`~kdutils.teachers` (the teacher cache), :mod:`~kdutils.airbench` (the strong CIFAR-10 teacher),
:mod:`~kdutils.regimes` (few labels, agreement, calibration), :mod:`~kdutils.results` (run records, tables), :mod:`~kdutils.plots`,
:mod:`~kdutils.notebook` (a chapter's first lines, the code it shows, the numbers its prose quotes), :mod:`~kdutils.dist` (several processes),
:mod:`~kdutils.recipes` (the chapters' recipes from the command line) and
:mod:`~kdutils.edition` (every chapter of a profile, executed in one command).
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # Without ipywidgets tqdm.auto warns "IProgress not found" and falls back to text bars,
    # which is what the book wants; imported once here, it stays quiet in every chapter.
    from tqdm import TqdmWarning as _TqdmWarning
    _warnings.simplefilter("ignore", _TqdmWarning)
    import tqdm.auto  # noqa: F401

from . import (airbench, autoaugment, checkpoint, data, dist, fingerprint, loop, losses,  # noqa: F401
               methods, models, notebook, params, plots, recipes, regimes, results, runs, settings, speed,
               teachers, train)
from .notebook import show_code  # noqa: F401

__version__ = "0.1.0"
