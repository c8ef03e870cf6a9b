"""The teacher cache: each teacher is trained once and reused by every chapter (chapter 2).

:func:`get_teacher` trains a teacher by a recipe, or loads it when a finished checkpoint of
the same recipe and data exists. A file lock makes a second process that asks for the same
teacher at the same time wait for the first one and then load its checkpoint.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

from filelock import FileLock

from .. import data as D
from .. import settings
from ..dist import world
from ..loop import ce_step, freeze
from ..models import WeightsUnavailable, build
from ..runs import Run, is_finished, run_code, run_paths
from ..settings import RunOptions
from ..speed import Speed
from ..train import Recipe, fit
from . import airbench


class TeacherMissing(FileNotFoundError):
    """A teacher was asked for without training, and no finished checkpoint of it exists."""


def teacher_recipe(epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> Recipe:
    """R5's teacher recipe: Adam, constant learning rate, no augmentation."""
    return Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def get_teacher(name: str, data, recipe: Recipe, *, options: RunOptions = RunOptions(),
                train_if_missing: bool = True, speed: Speed = Speed()) -> Run:
    """The teacher ``name`` trained by ``recipe`` on ``data``: loaded if it exists, else trained.

    The returned :class:`~kdutils.runs.Run` holds the model (frozen: eval mode, no gradients), its record (``run.record['test_acc']``) and ``run.record['run_key']``, which
    student records store as ``teacher_key``. With ``train_if_missing=False`` a missing
    teacher raises :class:`~kdutils.book.teachers.TeacherMissing` naming the checkpoint it looked for.
    """
    folder = settings.ckpt_dir(options.ckpt_dir) / "teacher"
    folder.mkdir(parents=True, exist_ok=True)
    model = build(name, seed=recipe.seed)
    if not train_if_missing:
        _, ckpt, _ = run_paths(model, data, recipe, chapter="teacher", method=name, params={},
                               options=options)
        if not is_finished(ckpt, recipe.epochs, run_code(model, ce_step)):
            raise TeacherMissing(
                f"no finished {name} teacher for this recipe and data: looked for {ckpt}. "
                "Run the chapter that trains it (chapter 2 for Part I) with the same "
                "parameters and ckpt_dir, or allow training it here (train_if_missing=True).")
    from contextlib import nullcontext

    # Under torchrun the processes train the teacher together; a file lock would deadlock them.
    lock = nullcontext() if world().distributed else FileLock(str(folder / f"{name}.lock"))
    with lock:
        run = fit(model, data, recipe, chapter="teacher", method=name, speed=speed, options=options)
    freeze(run.model)
    return run


class PretrainedTeacher(NamedTuple):
    """Chapter 10's teacher: the run, where it came from, and the layer whose feature map
    feature KD matches (with its channel count)."""

    run: Run
    how: str        # "imagenet", "airbench" (chapter 6's CIFAR-10 teacher) or "scratch"
    layer: str
    channels: int


def pretrained_teacher(P, data) -> PretrainedTeacher:
    """R4's teacher for chapter 10, or the closest thing this machine can have.

    With ``P.teacher_weights == "imagenet"``: torchvision's ImageNet ResNet18, backbone frozen,
    a new head trained ``P.teacher_epochs`` epochs (SGD 1e-3, momentum 0.9, as R4). When the
    weights cannot be had (no network, nothing in torch's cache), or with ``"none"``:

    - on CIFAR-10 at 32 px, the book's own CIFAR-10 teacher, the airbench network of
      chapter 6, trained on all 50,000 training images and loaded from its checkpoint as a
      pretrained teacher would be (trained first if no checkpoint exists; in the ``smoke``
      profile a short one on the chapter's images, in batches of ``P.batch_size``);
    - elsewhere, a ResNet18 trained from scratch on ``data`` (the CIFAR stem at small image
      sizes, torchvision's stem above 64 px; SGD one-cycle, peak 0.05, crop + flip).
    """
    opts = settings.run_options(P)
    kw = dict(options=opts, speed=Speed.from_params(P))
    if P.teacher_weights == "imagenet":
        recipe = Recipe(epochs=P.teacher_epochs, batch_size=P.batch_size, lr=1e-3,
                        optimizer="sgd", momentum=0.9)
        try:
            return PretrainedTeacher(get_teacher("resnet18_pretrained", data, recipe, **kw),
                                     "imagenet", "net.layer4", 512)
        except WeightsUnavailable as e:
            print(f"No pretrained teacher: {e}")
    if P.dataset == "cifar10" and P.image_size == 32:
        print("Falling back to the book's own CIFAR-10 teacher (chapter 6's airbench network).")
        # Chapter 6's teacher: its data, recipe and profile, and no speed switches of this
        # chapter, so that the checkpoint is the one chapter 6 wrote (smoke: a short one here).
        if P.profile == "smoke":
            teacher_data = data
            recipe = airbench.AirbenchRecipe(epochs=P.teacher_epochs, batch_size=P.batch_size)
        else:
            teacher_data, recipe = D.load_cifar10(P.data_dir), airbench.AirbenchRecipe()
            opts = replace(opts, profile="full")
        run = airbench.get_strong_teacher(teacher_data, recipe, options=opts)
        return PretrainedTeacher(run, "airbench", "groups.2", run.model.head.in_features)
    print("Falling back to a ResNet18 trained from scratch on this data (teacher_weights='none').")
    name = "resnet18" if P.image_size <= 64 else "resnet18_imagenet_stem"
    recipe = Recipe(epochs=P.teacher_epochs, batch_size=P.batch_size, lr=0.05, optimizer="sgd",
                    momentum=0.9, weight_decay=5e-4, schedule="onecycle", augment=True)
    return PretrainedTeacher(get_teacher(name, data, recipe, **kw), "scratch", "layer4", 512)
