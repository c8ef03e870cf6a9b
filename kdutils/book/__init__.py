"""What produces the book, beside the core (which never imports it).

:mod:`~kdutils.book.chapters` (every chapter described once: name, parameters, profiles, plan,
runner), :mod:`~kdutils.book.params` (the kinds of parameters and their checks, the profiles),
:mod:`~kdutils.book.notebook` (a chapter's first lines, the code it shows, the numbers its
prose quotes), :mod:`~kdutils.book.recipes` (what the chapters run) and
:mod:`~kdutils.book.cli` (the same from the command line), :mod:`~kdutils.book.edition`
(every chapter of a profile in one command), :mod:`~kdutils.book.teachers` (the teacher
cache), :mod:`~kdutils.book.airbench` (the strong CIFAR-10 teacher),
:mod:`~kdutils.book.regimes` (chapter 6's experiments: few labels, fixed views, agreement),
:mod:`~kdutils.book.overview` (the Results chapter's tables), :mod:`~kdutils.book.audit`
(pages against the records) and :mod:`~kdutils.book.plots`.
"""
# The two commands, cli (``python -m kdutils.book``) and edition (``python -m
# kdutils.book.edition``), are left to be imported on their own: run as modules, they must not
# be imported twice.
from . import (airbench, audit, chapters, notebook, overview, params, plots, recipes,  # noqa: F401
               regimes, teachers)
