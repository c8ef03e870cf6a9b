"""The teacher cache: each teacher is trained once and reused by every chapter (chapter 2).

:func:`get_teacher` trains a teacher by a recipe, or loads it when a finished checkpoint of
the same recipe and data exists. A file lock makes a second process that asks for the same
teacher at the same time wait for the first one and then load its checkpoint.
"""
from __future__ import annotations

from filelock import FileLock

from . import settings
from .models import build
from .train import Recipe, Run, fit, freeze, is_finished, run_paths


class TeacherMissing(FileNotFoundError):
    """A teacher was asked for without training, and no finished checkpoint of it exists."""


def teacher_recipe(epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> Recipe:
    """R5's teacher recipe: Adam, constant learning rate, no augmentation."""
    return Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def get_teacher(name: str, data, recipe: Recipe, *, profile: str = "full", device="auto",
                ckpt_dir=None, results_dir=None, progress: bool = True,
                train_if_missing: bool = True) -> Run:
    """The teacher ``name`` trained by ``recipe`` on ``data``: loaded if it exists, else trained.

    The returned :class:`~kdutils.train.Run` holds the model (frozen: eval mode, no gradients), its record (``run.record['test_acc']``) and ``run.record['run_key']``, which
    student records store as ``teacher_key``. With ``train_if_missing=False`` a missing
    teacher raises :class:`TeacherMissing` naming the checkpoint it looked for.
    """
    folder = settings.ckpt_dir(ckpt_dir) / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    model = build(name, seed=recipe.seed)
    if not train_if_missing:
        _, ckpt, _ = run_paths(model, data, recipe, chapter="teacher", method=name, params={},
                               profile=profile, teacher_key=None, ckpt_dir=ckpt_dir)
        if not is_finished(ckpt, recipe.epochs):
            raise TeacherMissing(
                f"no finished {name} teacher for this recipe and data: looked for {ckpt}. "
                "Run the chapter that trains it (chapter 2 for Part I) with the same "
                "parameters and ckpt_dir, or allow training it here (train_if_missing=True).")
    with FileLock(str(folder / f"{name}.lock")):
        run = fit(model, data, recipe, chapter="teacher", method=name,
                  profile=profile, device=device, ckpt_dir=ckpt_dir, results_dir=results_dir,
                  progress=progress)
    freeze(run.model)
    return run
