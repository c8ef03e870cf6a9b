"""Every chapter's recipe from the command line, and under ``torchrun`` on several processes::

    python -m kdutils.book hinton_kd --epochs 10 --seeds 0 1 2
    torchrun --nproc_per_node 4 -m kdutils.book resnet50_to_resnet18 --profile fast
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 -m kdutils.book self_distillation

A recipe is a chapter's runner (:data:`kdutils.book.chapters.CHAPTERS`): it takes the
chapter's parameters (``--name value``: the same names, defaults, profiles and checks as the
notebook's parameter cell) and runs what the chapter runs; the records land where the
chapter's do, so the chapter then only reloads them.
"""
from __future__ import annotations

import argparse
import sys

from .. import dist
from ..results import to_frame
from . import chapters, params

RECIPES = [name for name, ch in chapters.CHAPTERS.items() if ch.run is not None]


def parse(argv=None):
    """``(chapter name, checked parameters)`` from the command line."""
    ap = argparse.ArgumentParser(prog="python -m kdutils.book", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Parameters are the chapter's (see its first cell); "
                                        "'python -m kdutils.book NAME --help' lists them.")
    ap.add_argument("recipe", choices=RECIPES)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        ap.exit()
    name, rest = ap.parse_args(argv[:1]).recipe, argv[1:]
    ch = chapters.CHAPTERS[name]
    sub = argparse.ArgumentParser(prog=f"python -m kdutils.book {name}")
    for key in ch.schema:
        sub.add_argument(f"--{key}", nargs="+" if key == "seeds" else None,
                         help=f"default: {ch.defaults[key]!r}")
    args = sub.parse_args(rest)
    given = {k: (params.literal(v) if not isinstance(v, list) else [params.literal(s) for s in v])
             for k, v in vars(args).items() if v is not None}
    try:
        return name, chapters.check(name, **given)
    except params.ParameterError as e:
        sub.error(str(e))


def main(argv=None) -> list:
    name, P = parse(argv)
    w = dist.setup(P.device)
    try:
        runs = chapters.CHAPTERS[name].run(P)
        if w.main:
            table = to_frame(runs)[["chapter", "method", "seed", "epochs", "test_acc", "wall_time_s",
                                    "device", "path"]]
            print(f"{name}: {params.describe(P)}, {w.size} process(es)")
            print(table.to_string(index=False))
        return runs
    finally:
        dist.teardown()
