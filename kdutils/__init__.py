"""kdutils: the shared code of the book *Knowledge Distillation in PyTorch*.

One module per concern: :mod:`~kdutils.settings` (environment, paths), :mod:`~kdutils.params`
(chapter parameters, profiles, validation), :mod:`~kdutils.data` (datasets as tensors,
batched augmentation), :mod:`~kdutils.models`, :mod:`~kdutils.losses`,
:mod:`~kdutils.train` (the one loop), :mod:`~kdutils.checkpoint`, :mod:`~kdutils.teachers`
(the teacher cache), :mod:`~kdutils.results` (run records, tables), :mod:`~kdutils.plots`, :mod:`~kdutils.dist` (several processes)
and :mod:`~kdutils.recipes` (the chapters' recipes from the command line).
"""
from . import (checkpoint, data, dist, losses, methods, models, params, plots,  # noqa: F401
               recipes, results, settings, teachers, train)
from .plots import show_code  # noqa: F401

__version__ = "0.1.0"
