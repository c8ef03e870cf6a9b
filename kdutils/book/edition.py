"""The book in one command: every chapter of a profile executed with papermill, in order.

    python -m kdutils.book.edition --profile fast                 # Part II's GPU edition
    python -m kdutils.book.edition --profile fast --budget 25     # what fits in 25 minutes
    python -m kdutils.book.edition --profile full --estimate      # only the estimates
    python -m kdutils.book.edition --profile cpu --chapters pretrained_teacher --publish

The chapters of an edition are those whose ``profile`` parameter accepts it, in the table of
contents' order, with the Results chapter last (it reads every record the others wrote).
Each chapter is executed from a copy whose parameters cell is rewritten to the edition's
values (no papermill ``injected-parameters`` cell: the executed page shows the parameters
its run used, in one cell). Executed notebooks go to ``editions/<profile>/`` and, with
``--publish``, replace the chapter in ``book/`` once it has run to the end (or, run again,
when it had finished in an earlier call).

Before anything trains, each chapter's time is estimated from a few timed training steps
of every network it trains, on this device (:func:`kdutils.book.chapters.plan`, :func:`measure_rate`,
:func:`estimate`); with ``--budget`` only the chapters that fit run, and the rest are named
(a teacher that several chapters share counts once, in the first that runs). The edition resumes:
``editions/<profile>/edition.json`` remembers the chapters that finished, which are
skipped, and an interrupted chapter's runs resume from their own checkpoints. At the end
it prints one row per run: chapter, run, accuracy, wall time and training images/s.
"""
from __future__ import annotations

import argparse
import ast
import datetime as dt
import itertools
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import torch

from .. import settings
from ..checkpoint import atomic_write_json
from . import params
from .chapters import CHAPTERS, Chapter, Work, check, plan

RESULTS_CHAPTER = "results"   # reads records only: runs last, in every edition


@dataclass(frozen=True)
class Page:
    """A chapter of the registry and its notebook in one checkout of the book."""

    chapter: Chapter
    path: Path

    @property
    def name(self) -> str:
        return self.chapter.name

    @property
    def stem(self) -> str:
        return self.path.stem

    def accepts(self, profile: str) -> bool:
        return self.chapter.accepts(profile)


def chapters(root: Path | None = None) -> list[Page]:
    """The registry's chapters in ``_toc.yml`` order (those whose notebook exists)."""
    root = Path(root or settings.project_root())
    toc = (root / "_toc.yml").read_text()
    by_notebook = {c.notebook: c for c in CHAPTERS.values()}
    stems = [Path(f).name for f in re.findall(r"^\s*-?\s*(?:root|file):\s*(\S+)", toc, flags=re.M)]
    pages = [Page(by_notebook[s], by_notebook[s].path(root)) for s in stems if s in by_notebook]
    return [p for p in pages if p.path.exists()]


def edition(profile: str, root: Path | None = None, only: list[str] | None = None) -> list[Page]:
    """The chapters a ``profile`` edition executes, Results last; ``only``: names or notebooks."""
    if profile not in params.PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(params.PROFILES)}")
    every = chapters(root)
    if only:
        known = {c.stem for c in every} | {c.name for c in every}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise ValueError(f"unknown chapter(s) {', '.join(unknown)}; known: "
                             f"{', '.join(c.name for c in every)}")
        every = [c for c in every if c.stem in only or c.name in only]
        refused = [c.name for c in every if not c.accepts(profile)]
        if refused:
            raise ValueError(f"chapter(s) {', '.join(refused)} have no {profile!r} profile")
    chosen = [c for c in every if c.accepts(profile)]
    return ([c for c in chosen if c.name != RESULTS_CHAPTER]
            + [c for c in chosen if c.name == RESULTS_CHAPTER])


# ------------------------------------------------------------------ the parameters cell

def parameters_cell(nb: dict) -> dict:
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"a chapter needs exactly one cell tagged 'parameters', found {len(cells)}")
    return cells[0]


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def current_parameters(nb: dict) -> dict:
    """The values the parameters cell of notebook ``nb`` assigns."""
    return {node.targets[0].id: ast.literal_eval(node.value)
            for node in ast.parse(_source(parameters_cell(nb))).body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def checked(chapter: Page, values: dict) -> params.Params:
    """The chapter's parameters with ``values`` in place of its cell's, checked and profiled."""
    return check(chapter.name, **{**current_parameters(json.loads(chapter.path.read_text())),
                                         **values})


def set_parameters(nb: dict, chapter: Page, values: dict) -> dict:
    """``nb`` with the assignments of ``values`` rewritten in its parameters cell (comments
    kept), after checking them as the chapter itself would (:func:`kdutils.book.chapters.check`)."""
    values = plain(values)
    cell = parameters_cell(nb)
    source = _source(cell)
    current = current_parameters(nb)
    missing = sorted(set(values) - set(current))
    if missing:
        raise params.ParameterError(f"chapter {chapter.stem} has no parameter(s) "
                                    f"{', '.join(map(repr, missing))} in its parameters cell")
    check(chapter.name, **{**current, **values})  # refuses a bad value before any run
    lines = source.split("\n")
    assigns = {node.targets[0].id: node for node in ast.parse(source).body
               if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    # from the last line up, so that the line numbers of the ones above stay valid
    for name in sorted(values, key=lambda n: -assigns[n].lineno):
        node = assigns[name]
        first, last = node.lineno - 1, node.end_lineno - 1
        # ast's offsets count UTF-8 bytes; keep what precedes the value and what follows it
        before = lines[first].encode()[:node.value.col_offset].decode()
        after = lines[last].encode()[node.value.end_col_offset:].decode()   # spaces, comment
        lines[first:last + 1] = [before + _literal(values[name]) + after]
    cell["source"] = "\n".join(lines)
    if current_parameters(nb) != {**current, **values}:   # the cell says exactly what will run
        raise ValueError(f"could not rewrite the parameters cell of {chapter.stem}")
    return nb


def plain(values: dict) -> dict:
    """``values`` as a parameters cell (and a JSON state file) gives them back: tuples as lists."""
    return json.loads(json.dumps(values))


def _literal(value) -> str:
    """``value`` as the book writes literals: double-quoted strings, lists in brackets."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


# ------------------------------------------------------------------ estimates

def _network(arch: str, image_size: int) -> torch.nn.Module:
    from .. import models
    if arch == "smallcnn":
        return models.SmallCNN(image_size=image_size)
    if arch == "airbench":
        from .airbench import AirbenchNet
        return AirbenchNet()
    return models.build(arch, seed=0)


def measure_rate(arch: str, teacher: str | None, batch_size: int, image_size: int,
                 device: torch.device, steps: int = 3) -> float:
    """Training images/s of ``arch`` on ``device`` (its teacher's forward pass included),
    timed by :func:`kdutils.tools.bench.time_batches` (at least ``steps`` steps of synthetic images
    after one warm-up step) through :func:`kdutils.loop.train_epoch` and
    :func:`kdutils.loop.with_teacher`, in the precision and layout a run would use there."""
    from .. import methods
    from ..tools.bench import time_batches
    from ..loop import freeze, train_epoch, with_teacher
    from ..speed import Speed
    from ..train import Recipe, make_optimizer
    model = _network(arch, image_size)
    chosen = Speed().resolve(model, device, batch_size, image_size, measure=False)
    layout = torch.channels_last if chosen["channels_last"] else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    net_t = freeze(_network(teacher, image_size).to(device, memory_format=layout)) if teacher else None
    step = (methods.byot_step if arch == "resnet18_multiexit"
            else methods.kd_step if teacher else methods.ce_step)
    opt = make_optimizer(model, Recipe(epochs=1))
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch_size,), device=device)
    batches = lambda: with_teacher(itertools.repeat((x, y, None)), net_t,  # noqa: E731
                                   methods.kd_targets, None, chosen["amp"])
    return time_batches(lambda b: train_epoch(model, b, step, opt, amp=chosen["amp"]), batches,
                        device, warmup=1, steps=steps, repeats=1, batch_size=batch_size)


OVERHEAD = 1.05      # an allowance for what the timed steps leave out: data, checkpoints
EVAL_SPEED_UP = 3.0  # a forward pass costs about a third of a training step (forward + backward)


def estimate(works: list[Work], rate: Callable[[Work], float]) -> float:
    """Seconds for ``works`` at ``rate(work)`` training images/s: the training steps, plus an
    evaluation of ``eval_images`` after every epoch at ``EVAL_SPEED_UP`` times that rate,
    times ``OVERHEAD``."""
    return OVERHEAD * sum(w.runs * w.epochs * (w.images + w.eval_images / EVAL_SPEED_UP) / rate(w)
                          for w in works)


# ------------------------------------------------------------------ running an edition

@dataclass
class State:
    """What an edition has done: per chapter stem, its status, parameters and wall time."""
    path: Path
    chapters: dict = field(default_factory=dict)

    @staticmethod
    def load(path: Path) -> "State":
        data = json.loads(path.read_text()) if path.exists() else {}
        return State(path, data.get("chapters", {}))

    def save(self) -> None:
        atomic_write_json({"chapters": self.chapters}, self.path)

    def done(self, stem: str, values: dict) -> bool:
        entry = self.chapters.get(stem, {})
        return entry.get("status") == "done" and entry.get("parameters") == values


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def execute(chapter: Page, values: dict, out: Path, *, kernel: str = "python3",
            log_output: bool = False) -> float:
    """Execute ``chapter`` with ``values`` in its parameters cell into ``out``; wall seconds."""
    import nbformat
    import papermill as pm
    nb = nbformat.read(chapter.path, as_version=4)
    set_parameters(nb, chapter, values)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_name(f".{out.stem}.input.ipynb")
    nbformat.write(nb, source)
    t0 = time.perf_counter()
    try:  # no progress bars: the executed page is published and carries no bar residue
        with mock.patch.dict(os.environ, {"TQDM_DISABLE": "1"}):
            pm.execute_notebook(str(source), str(out), cwd=str(chapter.path.parent),
                                kernel_name=kernel, progress_bar=False, log_output=log_output)
    finally:
        source.unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    done = nbformat.read(out, as_version=4)   # name the chapter, not the temporary copy
    done.metadata.get("papermill", {})["input_path"] = f"{chapter.path.parent.name}/{chapter.path.name}"
    nbformat.write(done, out)
    return wall


def chapter_values(chapter: Page, profile: str, overrides: dict) -> dict:
    """The parameters an edition sets in ``chapter``: its profile, and those of ``overrides``
    the chapter has."""
    schema = chapter.chapter.schema
    values = {"profile": profile} if "profile" in schema else {}
    values.update({k: v for k, v in overrides.items() if k in schema})
    return plain(values)


Costs = list  # [(teacher key or None, seconds)]: what a chapter costs, its teachers apart


def within_budget(pending: list, budget_min: float | None, report: dict) -> list:
    """The ``(chapter, values)`` of ``pending`` (``(chapter, values, costs)`` in edition order)
    that fit ``budget_min`` minutes (all without one). A teacher shared by several chapters is
    paid by the first chosen; each chapter's estimate goes to ``report["estimates"]``, each
    chapter that does not fit to ``report["left_out"]``."""
    left = None if budget_min is None else budget_min * 60
    chosen, paid = [], set()
    for ch, values, costs in pending:
        est = sum(c for key, c in costs if key is None or key not in paid)
        report["estimates"][ch.stem] = est
        if left is not None and est > left:
            report["left_out"].append(ch.stem)
            continue
        chosen.append((ch, values))
        paid |= {key for key, _ in costs if key is not None}
        left = None if left is None else left - est
    return chosen


def run_edition(profile: str, *, root: Path | None = None, only: list[str] | None = None,
                overrides: dict | None = None, budget_min: float | None = None,
                out_dir: Path | None = None, publish: bool = False, restart: bool = False,
                estimate_only: bool = False, seconds: Callable[[Page, dict], float | Costs] | None = None,
                kernel: str = "python3", log=print) -> dict:
    """Run (or only estimate) the ``profile`` edition.

    ``seconds(chapter, values)`` estimates a chapter: a number, or ``[(teacher key or None,
    seconds), ...]`` so that a teacher several chapters share counts once, in the first
    chapter that runs (default: :func:`kdutils.book.chapters.plan` and :func:`measure_rate` on the
    chosen device).
    Returns ``{"ran", "skipped", "left_out", "failed", "not_run": [stems], "estimates":
    {stem: seconds}, "started_at"}``.
    """
    root = Path(root or settings.project_root())
    forced = settings.profile_override()
    if forced not in (None, profile):
        raise ValueError(f"${settings.PROFILE_VAR}={forced} would run every chapter in profile "
                         f"{forced!r}, not {profile!r}: unset it for this command")
    overrides = plain(overrides or {})
    if publish and set(overrides) - {"profile"}:
        raise params.ParameterError(
            f"--publish with {', '.join(overrides)}: a published chapter shows its own defaults "
            "and only the profile it ran with; run these values without --publish")
    todo = edition(profile, root, only)
    unused = sorted(set(overrides) - {k for ch in todo for k in ch.chapter.schema})
    if unused:
        raise params.ParameterError(f"no chapter of this edition has parameter(s) {', '.join(unused)}")
    out_dir = Path(out_dir or root / "editions" / profile)
    state = State.load(out_dir / "edition.json")
    seconds = seconds or _device_estimator(overrides.get("device", "auto"), log)
    report = {"ran": [], "skipped": [], "left_out": [], "failed": [], "not_run": [],
              "estimates": {}, "started_at": _now()}
    pending = []
    for ch in todo:
        values = chapter_values(ch, profile, overrides)
        out = out_dir / f"{ch.stem}.ipynb"
        if state.done(ch.stem, values) and not restart and out.exists():
            report["skipped"].append(ch.stem)
            if publish:   # finished in an earlier call: publish it now
                shutil.copyfile(out, ch.path)
            continue
        t0 = time.perf_counter()
        costs = seconds(ch, values)
        costs = costs if isinstance(costs, list) else [(None, float(costs))]
        pending.append((ch, values, costs))
        log(f"{ch.stem}: about {sum(c for _, c in costs) / 60:.1f} min "
            f"(estimated in {time.perf_counter() - t0:.0f} s)")
    chosen = within_budget(pending, budget_min, report)
    if report["left_out"]:
        log(f"left out (over the {budget_min:g}-minute budget): {', '.join(report['left_out'])}")
    if estimate_only:
        return report
    _run_chosen(chosen, out_dir, state, report, publish=publish, kernel=kernel, log=log)
    return report


def _run_chosen(chosen: list, out_dir: Path, state: State, report: dict, *, publish: bool,
                kernel: str, log) -> None:
    """Execute the ``(chapter, values)`` of ``chosen`` in order, recording each in ``state``
    and ``report``; the first failure stops the edition (the rest go to ``not_run``)."""
    for i, (ch, values) in enumerate(chosen):
        out = out_dir / f"{ch.stem}.ipynb"
        state.chapters[ch.stem] = {"status": "running", "parameters": values, "started_at": _now()}
        state.save()
        log(f"{ch.stem}: running {values}")
        try:
            wall = execute(ch, values, out, kernel=kernel)
        except Exception as e:  # the chapter's own error is in the executed notebook
            lines = str(e).strip().splitlines() or [type(e).__name__]
            state.chapters[ch.stem].update(status="failed", error=lines[-1][:300])
            state.save()
            report["failed"].append(ch.stem)
            report["not_run"] = [c.stem for c, _ in chosen[i + 1:]]
            log(f"{ch.stem}: failed ({lines[-1][:300]}); see {out}. Rerun the same command to resume.")
            return
        state.chapters[ch.stem].update(status="done", wall_s=round(wall, 1), finished_at=_now(),
                                       estimate_s=round(report["estimates"][ch.stem], 1))
        state.save()
        report["ran"].append(ch.stem)
        if publish:
            shutil.copyfile(out, ch.path)
        log(f"{ch.stem}: done in {wall / 60:.1f} min (estimated {report['estimates'][ch.stem] / 60:.1f})")


def _device_estimator(device: str, log=print) -> Callable[[Page, dict], Costs]:
    from ..train import pick_device
    dev = pick_device(device)
    rates: dict = {}

    def rate(w: Work) -> float:
        key = (w.arch, w.teacher, w.batch_size, w.image_size)
        if key not in rates:
            rates[key] = measure_rate(w.arch, w.teacher, w.batch_size, w.image_size, dev)
            alongside = f" with {w.teacher} alongside" if w.teacher else ""
            log(f"  {w.arch}{alongside}, batch {w.batch_size}, {w.image_size} px: "
                f"{rates[key]:.1f} training images/s on {dev}")
        return rates[key]

    def seconds(ch: Page, values: dict) -> Costs:
        return [((w.arch, w.images, w.epochs, w.batch_size) if w.is_teacher else None,
                 estimate([w], rate)) for w in plan(ch.name, checked(ch, values))]
    return seconds


def summary(profile: str, stems: list[str], since: str, root: Path | None = None, results_dir=None):
    """One row per run that an edition's chapters (``stems``) recorded from ``since`` (an ISO
    time) on: chapter, run, accuracy, wall time, training images/s (train_size x epochs /
    wall time), device. A teacher counts with the chapters that train it."""
    import pandas as pd

    from ..results import load_records
    root = Path(root or settings.project_root())
    by_stem = {c.stem: c for c in chapters(root)}
    names = {by_stem[s].name for s in stems if s in by_stem}
    teachers = {w.arch for s in stems if s in by_stem for w in _plan_quiet(by_stem[s], profile)
                if w.is_teacher}
    rec = load_records(results_dir)
    if rec.empty:
        return pd.DataFrame()
    # a teacher record's method is the network it trained ("resnet50")
    ours = rec["chapter"].isin(names) | ((rec["chapter"] == "teacher") & rec["method"].isin(teachers))
    rec = rec[ours & (rec["profile"] == profile) & (rec["finished_at"] >= since)]
    return pd.DataFrame({
        "chapter": rec["chapter"], "run": rec["method"] + " seed " + rec["seed"].astype(str),
        "accuracy (%)": rec["test_acc"], "wall time (min)": (rec["wall_time_s"] / 60).round(1),
        "images/s": (rec["train_size"] * rec["epochs"] / rec["wall_time_s"]).round(0),
        "device": rec["device"]}).sort_values(["chapter", "run"]).reset_index(drop=True)


def _plan_quiet(ch: Page, profile: str) -> list[Work]:
    try:
        return plan(ch.name, checked(ch, chapter_values(ch, profile, {})))
    except (ValueError, KeyError):
        return []


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m kdutils.book.edition", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--profile", required=True, choices=list(params.PROFILES))
    ap.add_argument("--chapters", nargs="+", help="stems or names (default: every chapter of the profile)")
    ap.add_argument("--budget", type=float, help="minutes: run only the chapters whose estimates fit")
    ap.add_argument("--estimate", action="store_true", help="print the estimates and stop")
    ap.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                    help="a parameter for every chapter that has it (e.g. device=cuda seeds=[0,1,2])")
    ap.add_argument("--out", type=Path, help="executed notebooks and state (default: editions/<profile>)")
    ap.add_argument("--publish", action="store_true", help="copy each finished chapter into book/")
    ap.add_argument("--restart", action="store_true", help="run finished chapters again")
    ap.add_argument("--kernel", default="python3", help="the Jupyter kernel that runs the chapters")
    args = ap.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        ap.error("--budget must be > 0 minutes")
    overrides = {}
    for item in args.set:
        if "=" not in item:
            ap.error(f"--set takes NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        overrides[name] = params.literal(value)
    try:
        report = run_edition(args.profile, only=args.chapters, overrides=overrides,
                             budget_min=args.budget, out_dir=args.out, publish=args.publish,
                             restart=args.restart, estimate_only=args.estimate, kernel=args.kernel)
    except (ValueError, params.ParameterError) as e:
        ap.error(str(e))
    if not args.estimate:  # the runs of this edition: from its first chapter's start on
        state = State.load(Path(args.out or settings.project_root() / "editions" / args.profile)
                           / "edition.json")
        stems = report["ran"] + report["skipped"]
        since = min([state.chapters[s]["started_at"] for s in stems] or [report["started_at"]])
        table = summary(args.profile, stems, since, results_dir=overrides.get("results_dir"))
        print(table.to_string(index=False) if len(table) else "no run records for these chapters")
    print(json.dumps({k: v for k, v in report.items() if k != "estimates"}))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
