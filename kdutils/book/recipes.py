"""Every chapter's recipe from the command line, and under ``torchrun`` on several processes::

    python -m kdutils.recipes hinton_kd --epochs 10 --seeds 0 1 2
    torchrun --nproc_per_node 4 -m kdutils.recipes resnet_kd --profile fast
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m kdutils.recipes selfdistill

A recipe takes the parameters of its chapter (``--name value``, the same names, defaults,
profiles and checks as the notebook's parameter cell) and runs what the chapter runs, with the
same kdutils models, losses and loop; the run records land where the chapter's do, so the
chapter then only reloads them. ``batch_size`` is the global batch, split across processes.
"""
from __future__ import annotations

import argparse
import sys
from functools import partial

from . import data as D
from . import dist, methods, models, params, teachers
from .results import to_frame
from . import settings
from .settings import run_options
from .speed import Speed
from .train import Recipe, sgd_recipe

PART_ONE = {"baseline": ("baseline", "ce"), "hinton_kd": ("hinton", "kd"),
            "cosine": ("cosine", "cosine"), "regressor": ("regressor", "hint")}
PART_TWO = {"resnet_kd": "resnet", "selfdistill": "selfdistill", "pretrained": "pretrained"}
RECIPES = {**{k: v[0] for k, v in PART_ONE.items()}, **PART_TWO}


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
                                **run_options(P))


def part_one(name: str, P) -> list:
    """Chapters 2-5: the DeepNN teacher (trained or loaded), then the chapter's students."""
    chapter, method = PART_ONE[name]
    data = load_data(P)
    teacher = part_one_teacher(P, data)
    weights = {k: P[k] for k in methods.METHODS[method].weights}
    runs = methods.train_seeds(method, data, seeds=P.seeds,
                               recipe=Recipe(epochs=P.epochs, batch_size=P.batch_size, lr=P.lr),
                               teacher=None if method == "ce" else teacher, weights=weights,
                               **run_options(P))
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
    return dict(seeds=P.seeds, recipe=sgd_recipe(P), speed=Speed.from_params(P), **run_options(P))


def resnet_teacher(P, data):
    """Chapter 8's teacher: a ResNet50 trained by the chapter's SGD recipe for
    ``P.teacher_epochs`` on :func:`teacher_data` (or loaded when it is finished)."""
    return teachers.get_teacher("resnet50", teacher_data(P, data),
                                sgd_recipe(P, epochs=P.teacher_epochs),
                                speed=Speed.from_params(P), **run_options(P))


def resnet_students(P, data, teacher) -> dict:
    """Chapter 8's students: ResNet18 from the same initial weights per seed, trained on
    ``data`` with cross-entropy alone and with Hinton KD from ``teacher``."""
    make = lambda seed: models.build("resnet18", seed=seed)  # noqa: E731
    common = dict(make=make, chapter="resnet", **part_two(P))
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
    return methods.train_seeds("byot", data, make=lambda s: models.build("resnet18_multiexit", seed=s),
                               step=methods.byot_step, chapter="selfdistill", weights=chosen,
                               **part_two(P))


def plain_resnet18(P, data) -> list:
    """Chapter 9's baseline, the plain ResNet18 with cross-entropy. Where its recipe, images
    and seeds are chapter 8's for the same profile, these are chapter 8's own runs (filed
    under chapter 8, trained once for both chapters); otherwise chapter 9's."""
    ch8 = params.check("resnet", **{k: P[k] for k in settings.RUN_OPTIONS + ("data_dir",)})
    shared = (sgd_recipe(P) == sgd_recipe(ch8) and P.seeds == ch8.seeds
              and (P.train_size, P.test_size) == (ch8.train_size, ch8.test_size))
    return methods.train_seeds("ce", data, make=lambda s: models.build("resnet18", seed=s),
                               chapter="resnet" if shared else "selfdistill", **part_two(P))


def selfdistill(P) -> list:
    """Chapter 9's main result: the four-exit ResNet18 and the plain one, same recipe."""
    data = load_data(P)
    return byot_runs(P, data) + plain_resnet18(P, data)


def pretrained_students(P, data, chosen) -> dict:
    """Chapter 10's students, small CNNs trained by R4's recipe (Adam, no augmentation): with
    cross-entropy alone, with logit KD and with feature KD from ``chosen``
    (:func:`kdutils.teachers.pretrained_teacher`)."""
    small = lambda seed: methods.seeded(lambda: models.SmallCNN(image_size=P.image_size), seed)  # noqa: E731
    with_proj = lambda seed: methods.seeded(  # noqa: E731
        lambda: methods.FeatureKDStudent(models.SmallCNN(image_size=P.image_size),
                                         teacher_ch=chosen.channels), seed)
    common = dict(part_two(P), chapter="pretrained",
                  recipe=Recipe(epochs=P.epochs, batch_size=P.batch_size, lr=P.lr, schedule=P.schedule))
    teacher = chosen.run
    return {"ce": methods.train_seeds("ce", data, make=small, **common),
            "kd": methods.train_seeds("kd", data, make=small, teacher=teacher,
                                      weights={"T": P.T, "alpha": P.alpha}, **common),
            "feature-kd": methods.train_seeds(
                "feature-kd", data, make=with_proj, step=methods.feature_kd_step, teacher=teacher,
                targets=partial(methods.feature_targets, layer=chosen.layer),
                weights={"feature_weight": P.feature_weight}, **common)}


def pretrained(P) -> list:
    """Chapter 10: the pretrained (or fallback) teacher and the three small-CNN students."""
    data = load_data(P)
    chosen = teachers.pretrained_teacher(P, data)
    return [chosen.run] + [run for runs in pretrained_students(P, data, chosen).values() for run in runs]


def run(name: str, P) -> list:
    """Run recipe ``name`` with checked parameters ``P``; returns the runs (teacher first)."""
    if name in PART_ONE:
        return part_one(name, P)
    return {"resnet_kd": resnet_kd, "selfdistill": selfdistill, "pretrained": pretrained}[name](P)


def parse(argv=None):
    """``(recipe name, checked parameters)`` from the command line."""
    ap = argparse.ArgumentParser(prog="python -m kdutils.recipes", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Parameters are the chapter's (see its first cell); "
                                        "'python -m kdutils.recipes NAME --help' lists them.")
    ap.add_argument("recipe", choices=list(RECIPES))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        ap.exit()
    first, rest = ap.parse_args(argv[:1]), argv[1:]
    chapter = RECIPES[first.recipe]
    sub = argparse.ArgumentParser(prog=f"python -m kdutils.recipes {first.recipe}")
    for name in params.SCHEMAS[chapter]:
        default = params.DEFAULTS[chapter][name]
        sub.add_argument(f"--{name}", nargs="+" if name == "seeds" else None,
                         help=f"default: {default!r}")
    args = sub.parse_args(rest)
    given = {k: (params.literal(v) if not isinstance(v, list) else [params.literal(s) for s in v])
             for k, v in vars(args).items() if v is not None}
    try:
        return first.recipe, params.check(chapter, **given)
    except params.ParameterError as e:
        sub.error(str(e))


def main(argv=None) -> list:
    name, P = parse(argv)
    w = dist.setup(P.device)
    try:
        runs = run(name, P)
        if w.main:
            table = to_frame(runs)[["chapter", "method", "seed", "epochs", "test_acc", "wall_time_s",
                                    "device", "path"]]
            print(f"{name}: {params.describe(P)}, {w.size} process(es)")
            print(table.to_string(index=False))
        return runs
    finally:
        dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
