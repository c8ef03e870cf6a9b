"""The teacher cache: each teacher is trained once and reused by every chapter (chapter 2).

:func:`get_teacher` trains a teacher by a recipe, or loads it when a finished checkpoint of
the same recipe and data exists. A file lock makes a second process that asks for the same
teacher at the same time wait for the first one and then load its checkpoint.
"""
from __future__ import annotations

from filelock import FileLock

from . import settings
from .dist import world
from .models import WeightsUnavailable, build
from .train import Recipe, Run, Speed, fit, freeze, is_finished, run_paths


class TeacherMissing(FileNotFoundError):
    """A teacher was asked for without training, and no finished checkpoint of it exists."""


def teacher_recipe(epochs: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> Recipe:
    """R5's teacher recipe: Adam, constant learning rate, no augmentation."""
    return Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)


def sgd_recipe(P, *, epochs: int | None = None, seed: int = 0) -> Recipe:
    """Part II's recipe from a chapter's parameters ``P``: SGD (momentum 0.9, weight decay
    5e-4), random crop + flip, ``P.schedule`` and, where the chapter has them, AutoAugment
    and RandomErasing (R1). ``epochs`` defaults to ``P.epochs``."""
    return Recipe(epochs=epochs or P.epochs, batch_size=P.batch_size, lr=P.lr, optimizer="sgd",
                  momentum=0.9, weight_decay=5e-4, schedule=P.schedule, augment=True,
                  seed=seed, autoaugment=P.get("autoaugment", False),
                  erasing=P.get("erasing", 0.0))


def speed(P) -> Speed:
    """The fast-path switches of a Part II chapter's parameters."""
    return Speed(channels_last=P.channels_last, amp=P.amp, compile=P.compile)


def get_teacher(name: str, data, recipe: Recipe, *, profile: str = "full", device="auto",
                ckpt_dir=None, results_dir=None, progress: bool = True,
                train_if_missing: bool = True, speed: Speed = Speed()) -> Run:
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
    from contextlib import nullcontext

    # Under torchrun the processes train the teacher together; a file lock would deadlock them.
    lock = nullcontext() if world().distributed else FileLock(str(folder / f"{name}.lock"))
    with lock:
        run = fit(model, data, recipe, chapter="teacher", method=name,
                  profile=profile, device=device, ckpt_dir=ckpt_dir, results_dir=results_dir,
                  progress=progress, speed=speed)
    freeze(run.model)
    return run


def pretrained_teacher(P, data) -> tuple[Run, str]:
    """R4's teacher for chapter 10: ``(run, how)``.

    With ``P.teacher_weights == "imagenet"``: torchvision's ImageNet ResNet18, backbone frozen,
    a new head trained ``P.teacher_epochs`` epochs (SGD 1e-3, momentum 0.9, as R4). When the
    weights cannot be had (no network, nothing in torch's cache), or with ``"none"``, it says
    so and trains a ResNet18 from scratch on ``data`` instead: the CIFAR stem at small image
    sizes, torchvision's stem above 64 px (SGD one-cycle, peak 0.05, crop + flip).
    """
    kw = dict(settings.run_options(P), speed=speed(P))
    if P.teacher_weights == "imagenet":
        recipe = Recipe(epochs=P.teacher_epochs, batch_size=P.batch_size, lr=1e-3,
                        optimizer="sgd", momentum=0.9)
        try:
            return get_teacher("resnet18_pretrained", data, recipe, **kw), "imagenet"
        except WeightsUnavailable as e:
            print(f"No pretrained teacher: {e}\nFalling back to a ResNet18 trained from scratch "
                  "on this data (teacher_weights='none').")
    name = "resnet18" if P.image_size <= 64 else "resnet18_imagenet_stem"
    recipe = Recipe(epochs=P.teacher_epochs, batch_size=P.batch_size, lr=0.05, optimizer="sgd",
                    momentum=0.9, weight_decay=5e-4, schedule="onecycle", augment=True)
    return get_teacher(name, data, recipe, **kw), "scratch"
