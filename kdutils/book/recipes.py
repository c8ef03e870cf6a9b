"""What the chapters run, as functions of their checked parameters ``P``: the runner of each
chapter entry in :mod:`kdutils.book.chapters`, and the pieces the notebooks call.

Each function runs what its chapter runs, with the same kdutils models, losses and loop; the
run records land where the chapter's do, so the chapter then only reloads them. Under
``torchrun`` (the command line, :mod:`kdutils.book.cli`) ``batch_size`` is the global batch,
split across processes.
"""
from __future__ import annotations

from functools import partial

from .. import data as D
from .. import dist, methods, models
from ..loop import Teacher
from ..settings import run_options
from ..speed import Speed
from ..train import Recipe
from . import teachers

RESNET_CHAPTER, SELF_CHAPTER, PRETRAINED_CHAPTER = ("resnet50_to_resnet18", "self_distillation",
                                                    "pretrained_teacher")


def sgd_recipe(P, *, epochs: int | None = None, seed: int = 0) -> Recipe:
    """Part II's recipe from a chapter's parameters ``P``: SGD (momentum 0.9, weight decay
    5e-4), random crop + flip, ``P.schedule`` and, where the chapter has them, AutoAugment
    and RandomErasing (R1). ``epochs`` defaults to ``P.epochs``."""
    return Recipe(epochs=epochs or P.epochs, batch_size=P.batch_size, lr=P.lr, optimizer="sgd",
                  momentum=0.9, weight_decay=5e-4, schedule=P.schedule, augment=True,
                  seed=seed, autoaugment=P.get("autoaugment", False),
                  erasing=P.get("erasing", 0.0))


def load_data(P, train_size="students"):
    """The images of a chapter's parameters ``P``: its dataset at its image size, its training
    and test sizes (``train_size`` replaces the students' size, e.g. for a teacher that sees
    more)."""
    train_size = P.train_size if train_size == "students" else train_size
    with dist.main_first():  # rank 0 decodes and caches the images, the others then read the cache
        return D.load_dataset(P.dataset, P.data_dir, image_size=P.get("image_size", 32),
                              train_size=train_size, test_size=P.test_size)


def part_one_teacher(P, data):
    """Part I's teacher, ``P.teacher`` (DeepNN), by R5's recipe (Adam, ``P.teacher_epochs``
    epochs): trained by the first chapter that asks for it, loaded by the others."""
    return teachers.get_teacher(P.teacher, data, teachers.teacher_recipe(P.teacher_epochs, P.batch_size, P.lr),
                                options=run_options(P))


def part_one(chapter: str, method: str, P) -> list:
    """Chapters 2-5: the DeepNN teacher (trained or loaded), then ``method``'s students."""
    data = load_data(P)
    teacher = part_one_teacher(P, data)
    weights = {k: P[k] for k in methods.METHODS[method].weights}
    runs = methods.train_seeds(method, data, seeds=P.seeds, chapter=chapter,
                               recipe=Recipe(epochs=P.epochs, batch_size=P.batch_size, lr=P.lr),
                               teacher=None if method == "ce" else teacher, weights=weights,
                               options=run_options(P))
    return [teacher] + runs


def teacher_data(P, data):
    """The images a chapter's teacher learns from: the students' ``data``, unless the profile
    gives the teacher more (``P.teacher_train_size``; None: the whole training set). The test
    images are the same."""
    if "teacher_train_size" not in P or P.teacher_train_size == P.train_size:
        return data
    return load_data(P, P.teacher_train_size)


def part_two(P) -> dict:
    """What every Part II student run takes from the chapter's parameters: its seeds, the
    SGD recipe, the speed switches and the run options."""
    return dict(seeds=P.seeds, recipe=sgd_recipe(P), speed=Speed.from_params(P), options=run_options(P))


def resnet_teacher(P, data):
    """Chapter 8's teacher: a ResNet50 trained by the chapter's SGD recipe for
    ``P.teacher_epochs`` on :func:`teacher_data` (or loaded when it is finished)."""
    return teachers.get_teacher("resnet50", teacher_data(P, data),
                                sgd_recipe(P, epochs=P.teacher_epochs),
                                speed=Speed.from_params(P), options=run_options(P))


def resnet_students(P, data, teacher) -> dict:
    """Chapter 8's students: ResNet18 from the same initial weights per seed, trained on
    ``data`` with cross-entropy alone and with Hinton KD from ``teacher``."""
    common = dict(student="resnet18", chapter=RESNET_CHAPTER, **part_two(P))
    return {"ce": methods.train_seeds("ce", data, **common),
            "kd": methods.train_seeds("kd", data, teacher=teacher,
                                      weights={"T": P.T, "alpha": P.alpha}, **common)}


def resnet_kd(P) -> list:
    """Chapter 8: the ResNet50 teacher, then ResNet18 with cross-entropy and with KD."""
    data = load_data(P)
    teacher = resnet_teacher(P, data)
    students = resnet_students(P, data, teacher)
    return [teacher] + students["ce"] + students["kd"]


def byot_runs(P, data, **weights) -> list:
    """Chapter 9's four-exit ResNet18 trained with BYOT's loss: ``P``'s loss weights, any of
    them replaced by ``weights`` (e.g. ``detach_teacher=False``)."""
    chosen = {"T": P.T, "kd_weight": P.kd_weight, "feature_weight": P.feature_weight,
              "detach_teacher": P.detach_teacher, **weights}
    return methods.train_seeds("byot", data, student="resnet18_multiexit", chapter=SELF_CHAPTER,
                               weights=chosen, **part_two(P))


def plain_resnet18(P, data, ch8) -> list:
    """Chapter 9's baseline, the plain ResNet18 with cross-entropy. Where its recipe, images
    and seeds are chapter 8's (``ch8``, its parameters in the same profile), these are chapter
    8's own runs (filed under chapter 8, trained once for both chapters); otherwise chapter 9's."""
    shared = (sgd_recipe(P) == sgd_recipe(ch8) and P.seeds == ch8.seeds
              and (P.train_size, P.test_size) == (ch8.train_size, ch8.test_size))
    return methods.train_seeds("ce", data, student="resnet18",
                               chapter=RESNET_CHAPTER if shared else SELF_CHAPTER, **part_two(P))


def selfdistill(P, ch8) -> list:
    """Chapter 9's main result: the four-exit ResNet18 and the plain one, same recipe."""
    data = load_data(P)
    return byot_runs(P, data) + plain_resnet18(P, data, ch8)


def pretrained_students(P, data, chosen) -> dict:
    """Chapter 10's students, small CNNs trained by R4's recipe (Adam, no augmentation): with
    cross-entropy alone, with logit KD and with feature KD from ``chosen``
    (:func:`kdutils.book.teachers.pretrained_teacher`)."""
    small = lambda seed: methods.seeded(lambda: models.SmallCNN(image_size=P.image_size), seed)  # noqa: E731
    with_proj = lambda seed: methods.seeded(  # noqa: E731
        lambda: methods.FeatureKDStudent(models.SmallCNN(image_size=P.image_size),
                                         teacher_ch=chosen.channels), seed)
    common = dict(part_two(P), chapter=PRETRAINED_CHAPTER,
                  recipe=Recipe(epochs=P.epochs, batch_size=P.batch_size, lr=P.lr, schedule=P.schedule))
    run = chosen.run
    features = Teacher(run.model, partial(methods.feature_targets, layer=chosen.layer),
                       key=run.record["run_key"])
    return {"ce": methods.train_seeds("ce", data, student=small, **common),
            "kd": methods.train_seeds("kd", data, student=small, teacher=run,
                                      weights={"T": P.T, "alpha": P.alpha}, **common),
            "feature_kd": methods.train_seeds("feature_kd", data, student=with_proj, teacher=features,
                                              weights={"feature_weight": P.feature_weight}, **common)}


def pretrained(P) -> list:
    """Chapter 10: the pretrained (or fallback) teacher and the three small-CNN students."""
    data = load_data(P)
    chosen = teachers.pretrained_teacher(P, data)
    return [chosen.run] + [run for runs in pretrained_students(P, data, chosen).values() for run in runs]
