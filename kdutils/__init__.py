"""kdutils: the shared code of the book *Knowledge Distillation in PyTorch*.

The package itself is what the chapters teach and a reader reuses, one module per concern:

* :mod:`~kdutils.data` (datasets as tensors, batched augmentation; :mod:`~kdutils.autoaugment`),
  :mod:`~kdutils.models`, :mod:`~kdutils.hooks` (intermediate outputs by layer name);
* :mod:`~kdutils.losses` (the losses as functions of tensors) and :mod:`~kdutils.methods` (every
  student method of the book: its step, what it needs from the teacher, one registry);
* :mod:`~kdutils.loop` (one epoch, evaluation), :mod:`~kdutils.train` (``fit``: a whole run),
  :mod:`~kdutils.runs` (a run's key, checkpoint and record; :mod:`~kdutils.checkpoint`,
  :mod:`~kdutils.fingerprint`), :mod:`~kdutils.results` (run records as tables);
* :mod:`~kdutils.speed` (precision, memory layout), :mod:`~kdutils.dist` (several processes),
  :mod:`~kdutils.settings` (environment variables, folders, run options).

Beside it, and never imported by it: :mod:`kdutils.book`, what produces this book (the
chapter registry, notebook set-up, recipes, the edition, teachers, plots), and
:mod:`kdutils.tools`, what measures the machine (benchmark, CPU setting chooser, scale-out).
"""
import warnings as _warnings

with _warnings.catch_warnings():
    # Without ipywidgets tqdm.auto warns "IProgress not found" and falls back to text bars,
    # which is what the book wants; imported once here, it stays quiet in every chapter.
    from tqdm import TqdmWarning as _TqdmWarning
    _warnings.simplefilter("ignore", _TqdmWarning)
    import tqdm.auto  # noqa: F401

from . import (autoaugment, checkpoint, data, dist, fingerprint, hooks, loop, losses,  # noqa: F401
               methods, models, results, runs, settings, speed, train)

__version__ = "0.2.0"
