"""When distillation pays: few labels, soft targets on unlabelled images, and what a
distilled student shares with its teacher beyond accuracy (chapter "When does distillation pay?").

* :func:`label_subset` picks the labelled images of a run (a seeded, class-balanced draw);
  :func:`repeat_to` repeats them into a training set of fixed size, so that every run of a
  comparison takes the same number of optimiser steps whatever its number of labels.
* :func:`kdutils.methods.kd_unlabelled_step` is Hinton's loss when only some images have a
  label: the soft term on every image, cross-entropy on the labelled ones.
* :func:`few_label_runs` trains cross-entropy, KD on the same images, and KD with the
  teacher's soft targets on all training images, for each label fraction and seed.
* :func:`teacher_agreement` and :func:`calibration` measure a student against its teacher:
  top-1 agreement, KL divergence, expected calibration error and the reliability curve;
  :func:`soft_entropy` how soft a teacher's targets are at a temperature.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import settings
from ..checkpoint import atomic_save, load_checkpoint
from ..data import FixedViews, ImageData, TensorLoader
from ..loop import Teacher, precompute_teacher
from ..methods import METHODS, kd_targets, method_weights
from ..models import build
from ..results import paired_comparison
from ..runs import run_key
from ..settings import RunOptions
from ..train import Recipe, Run, fit, pick_device

CHAPTER = "when_distillation_pays"
ARMS = ("ce", "kd", "kd_unlabelled", "soft_only", "pseudo_label")
# an arm that is a registered method at other loss weights: its method and those weights
ARM_METHODS = {"soft_only": ("kd_unlabelled", {"alpha": 1.0})}
# the arms that learn from every training image, labelled or not
ALL_IMAGES = ("kd_unlabelled", "soft_only", "pseudo_label")
VIEW_ARMS = ("ce", "kd", "kd_inconsistent")


def label_subset(labels: torch.Tensor, fraction: float, seed: int,
                 num_classes: int = 10) -> torch.Tensor:
    """Sorted indices of ``fraction`` of the images, the same number from every class,
    drawn at random from ``seed`` (at least one image per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(10_007 + seed)
    per_class = max(1, round(fraction * len(labels) / num_classes))
    keep = []
    for c in range(num_classes):
        members = torch.nonzero(labels == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(keep).sort().values


def repeat_to(data: ImageData, idx: torch.Tensor, size: int) -> tuple[ImageData, torch.Tensor]:
    """A training set of ``size`` images made of the images ``idx``, repeated in turn (the
    test and validation sets are unchanged), and ``rows``: which original image each of its
    images is. One epoch over it visits every chosen image about ``size / len(idx)`` times."""
    rows = idx.repeat(-(-size // len(idx)))[:size]
    return replace(data, train_x=data.train_x[rows], train_y=data.train_y[rows]), rows


def train_logits(teacher: Run, data: ImageData, device="auto", ckpt_dir=None) -> torch.Tensor:
    """The frozen teacher's logits for every training image, in dataset order (no
    augmentation: exact for every epoch of an unaugmented recipe). Computed once per teacher
    and training set, then kept beside the teacher's checkpoint (``*.logits.pt``)."""
    dev = pick_device(device)
    key = run_key(teacher=teacher.record["run_key"], data=data.source, n=len(data.train_y),
                  labels=int(data.train_y.sum()))
    path = settings.ckpt_dir(ckpt_dir) / "teacher" / f"{teacher.record['run_key']}-{key}.logits.pt"
    if path.is_file():
        return load_checkpoint(path, map_location=dev)["logits"]
    logits = precompute_teacher(teacher.model.to(dev).eval(), kd_targets, data, dev)["logits"]
    atomic_save({"logits": logits.cpu()}, path)
    return logits


@torch.no_grad()
def test_logits(net: nn.Module, data: ImageData, device, batch_size: int = 1000) -> torch.Tensor:
    """``net``'s logits for every test image, in order, on the CPU (eval mode, restored after)."""
    was = net.training
    net.eval()
    loader = TensorLoader(data.test_x, data.test_y, batch_size, shuffle=False, mean=data.mean,
                          std=data.std, device=device)
    out = torch.cat([net(x).float().cpu() for x, _, _ in loader])
    net.train(was)
    return out


def few_label_runs(data: ImageData, teacher: Run, *, fractions, seeds, epochs: int,
                   batch_size: int = 128, lr: float = 1e-3, T: float = 5.0, alpha: float = 0.5,
                   arms=ARMS, logits: torch.Tensor | None = None,
                   options: RunOptions = RunOptions()) -> list[Run]:
    """For every label ``fraction`` and seed, LightNN trained by each of ``arms``:

    * ``ce``: cross-entropy on the labelled images;
    * ``kd``: Hinton's loss on the same images (the teacher's soft targets and the labels);
    * ``kd_unlabelled``: the soft targets on *all* training images, labels only where they
      exist (at fraction 1 it is ``kd`` and is skipped);
    * ``soft_only``: the same at ``alpha = 1``: the soft targets alone, no label at all;
    * ``pseudo_label``: cross-entropy on all images, with the teacher's top class where an
      image has no label (hard pseudo-labels).

    The arms on all images are skipped at fraction 1, where they add nothing to ``kd``.

    Every run takes ``epochs`` passes over a training set as large as the full one
    (:func:`repeat_to`), so all runs make the same number of optimiser steps. The labelled
    images of a seed are the same in every arm (paired); the teacher's logits are computed
    once for the whole training set (or taken from ``logits``, the result of
    :func:`train_logits`) and shared. Records carry ``fraction`` and ``labelled``.
    """
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; known: {', '.join(ARMS)}")
    cache = {"logits": logits}

    def all_logits():
        if cache["logits"] is None:
            cache["logits"] = train_logits(teacher, data, options.device, options.ckpt_dir)
        return cache["logits"]

    runs = []
    for fraction in fractions:
        for seed in seeds:
            idx = label_subset(data.train_y, fraction, seed, len(data.classes))
            recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
            labelled, rows = repeat_to(data, idx, len(data.train_y))
            for arm in arms:
                if arm in ALL_IMAGES and fraction == 1:
                    continue
                weights = {"T": T, "alpha": alpha} if arm in ("kd", "kd_unlabelled", "soft_only") else {}
                table = partial(_few_label_table, arm, all_logits, idx, rows)
                runs.append(_train_arm(arm, data if arm in ALL_IMAGES else labelled, recipe,
                                       teacher, table, weights,
                                       {"fraction": fraction, "labelled": len(idx)}, options))
    return runs


def _few_label_table(arm: str, all_logits, idx, rows) -> dict:
    """The teacher's outputs an arm of :func:`few_label_runs` looks up: the logits of the
    repeated labelled images (``kd``), or of every image with a mask of the labelled ones."""
    t_all = all_logits()
    if arm == "kd":
        return {"logits": t_all[rows]}
    mask = torch.zeros(len(t_all), dtype=torch.bool, device=t_all.device)
    mask[idx.to(t_all.device)] = True
    return {"logits": t_all, "labelled": mask}


def _train_arm(arm: str, data, recipe, teacher: Run, table, weights: dict, extra: dict,
               options: RunOptions) -> Run:
    """One LightNN run of chapter 6 by method ``arm`` (:data:`kdutils.methods.METHODS`) with
    the teacher's outputs from ``table()`` (computed only if the run trains); ``extra``
    describes the run's images in its record."""
    name, fixed = ARM_METHODS.get(arm, (arm, {}))
    method = METHODS[name]
    weights = method_weights(name, {**weights, **fixed}) if weights or fixed else {}
    step = partial(method.step, **weights) if weights else method.step
    with_teacher = None
    if method.targets is not None:
        with_teacher = Teacher(teacher.model, method.targets, key=teacher.record["run_key"],
                               outputs=table)
    return fit(build("lightnn", seed=recipe.seed), data, recipe, chapter=CHAPTER, method=arm,
               step=step, teacher=with_teacher, params={**extra, **weights}, options=options)


def temperature_grid(data: ImageData, teacher: Run, *, temperatures, alphas, fraction: float,
                     seeds, epochs: int, logits: torch.Tensor | None = None,
                     val_size: int | None = None, **kwargs) -> list[Run]:
    """KD on the labelled images (arm ``kd`` of :func:`few_label_runs`) for every temperature
    ``T`` in ``temperatures`` and soft-target weight ``alpha`` in ``alphas``, at one label
    ``fraction``, plus the cross-entropy runs it is paired with. With ``val_size``, that many
    training images are held out first (:meth:`~kdutils.data.ImageData.holdout`) and every run
    records its accuracy on them, so that :func:`grid_table` can choose a cell without looking
    at the test set. ``kwargs`` go to :func:`few_label_runs` (batch size, learning rate, run
    options)."""
    if not temperatures or not alphas:
        raise ValueError("temperatures and alphas must each hold at least one value")
    if val_size:
        data, logits = data.holdout(val_size), None   # the teacher's table: of the rest
    runs = few_label_runs(data, teacher, fractions=[fraction], seeds=seeds, epochs=epochs,
                          arms=("ce",), logits=logits, **kwargs)
    for T in temperatures:
        for alpha in alphas:
            runs += few_label_runs(data, teacher, fractions=[fraction], seeds=seeds,
                                   epochs=epochs, T=T, alpha=alpha, arms=("kd",),
                                   logits=logits, **kwargs)
    return runs


def grid_table(records, confidence: float = 0.95):
    """One row per (T, alpha) of :func:`temperature_grid`'s runs: seeds, mean accuracy, the
    difference to cross-entropy paired by seed with its ``confidence`` interval and, for runs
    with a held-out set, the mean last-epoch validation accuracy (``val_mean``) and
    ``chosen``: True for the cell with the best one (the choice the test set never sees)."""
    params = records["params"]
    cell = [("ce" if m == "ce" else f"T={p['T']:g}, alpha={p['alpha']:g}")
            for m, p in zip(records["method"], params)]
    table = paired_comparison(records.assign(cell=cell), baseline="ce", label="cell")
    kd_rows = table[table["cell"] != "ce"].copy()
    by_cell = dict(zip(cell, params))
    kd_rows.insert(0, "T", [by_cell[c]["T"] for c in kd_rows["cell"]])
    kd_rows.insert(1, "alpha", [by_cell[c]["alpha"] for c in kd_rows["cell"]])
    val = [h[-1].get("val_acc") for h in records["history"]]
    if all(v is not None for v in val):
        means = records.assign(cell=cell, val=val).groupby("cell")["val"].mean()
        kd_rows["val_mean"] = kd_rows["cell"].map(means)
        kd_rows["chosen"] = kd_rows.index == kd_rows["val_mean"].idxmax()
    return kd_rows.drop(columns="cell").sort_values(["T", "alpha"]).reset_index(drop=True)


def view_logits(teacher: Run, data: ImageData, views: int, view_seed: int = 0, device="auto",
                ckpt_dir=None) -> torch.Tensor:
    """The frozen teacher's logits for each of ``views`` fixed crop-and-flip views of every
    training image (:class:`kdutils.data.FixedViews` drawn from ``view_seed``, as
    :func:`kdutils.train.fit` draws them for ``Recipe(views=views)``): row ``view * N +
    image``. Computed once, then kept beside the teacher's checkpoint. It holds ``views * N *
    classes`` floats: 3.2 MB for 8 views of 10,000 CIFAR-10 images."""
    dev = pick_device(device)
    key = run_key(teacher=teacher.record["run_key"], data=data.source, n=len(data.train_y),
                  labels=int(data.train_y.sum()), pixels=int(data.train_x[:, :, 0, 0].sum()),
                  views=views, view_seed=view_seed)
    path = settings.ckpt_dir(ckpt_dir) / "teacher" / f"{teacher.record['run_key']}-{key}.views.pt"
    if path.is_file():
        return load_checkpoint(path, map_location=dev)["logits"]
    fixed = FixedViews.draw(len(data.train_y), views, view_seed)
    logits = precompute_teacher(teacher.model.to(dev).eval(), kd_targets, data, dev,
                                views=fixed)["logits"]
    atomic_save({"logits": logits.cpu()}, path)
    return logits


def view_runs(data: ImageData, teacher: Run, *, fraction: float, views: int, epoch_counts,
              seeds, batch_size: int = 128, lr: float = 1e-3, T: float = 5.0,
              alpha: float = 0.5, arms=VIEW_ARMS, subset_seed: int = 0,
              logits: torch.Tensor | None = None, options: RunOptions = RunOptions()) -> list[Run]:
    """Training with crop and flip, with targets consistent with the student's view or not.

    Every run trains LightNN on the same ``fraction`` of the training images (a class-balanced
    draw from ``subset_seed``, all labelled) for each number of epochs in ``epoch_counts``.
    Each epoch the student sees one of ``views`` fixed crop-and-flip views of every image
    (``Recipe(views=views)``: the same views in every arm). The arms differ only in targets:

    * ``ce``: the labels;
    * ``kd``: Hinton's loss with the teacher's logits *for the view the student sees*
      (:func:`view_logits`, computed once: consistent teaching);
    * ``kd_inconsistent``: Hinton's loss with the teacher's logits for the unaugmented
      image (``logits``, the result of :func:`train_logits`, or computed).
    """
    unknown = [a for a in arms if a not in VIEW_ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(map(repr, unknown))}; known: {', '.join(VIEW_ARMS)}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    idx = label_subset(data.train_y, fraction, subset_seed, len(data.classes))
    subset, _ = repeat_to(data, idx, len(idx))

    def table(arm):   # what the teacher saw: the student's view, or the unaugmented image
        if METHODS[arm].teacher_sees == "view":
            return {"logits": view_logits(teacher, subset, views, 0, options.device, options.ckpt_dir)}
        clean = logits if logits is not None else train_logits(teacher, data, options.device,
                                                               options.ckpt_dir)
        return {"logits": clean[idx.to(clean.device)].repeat(views, 1)}

    extra = {"fraction": fraction, "images": len(idx), "subset_seed": subset_seed}
    return [_train_arm(arm, subset, Recipe(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                           views=views),
                       teacher, partial(table, arm), {} if arm == "ce" else {"T": T, "alpha": alpha},
                       extra, options)
            for epochs in epoch_counts for seed in seeds for arm in arms]


def view_table(records, confidence: float = 0.95):
    """Per number of epochs and arm of :func:`view_runs`: seeds, mean accuracy, the paired
    difference to ``ce`` with its ``confidence`` interval, and the CPU minutes of its runs."""
    import pandas as pd
    parts = []
    for epochs, group in records.groupby("epochs"):
        table = paired_comparison(group, baseline="ce", confidence=confidence)
        table["cpu_min"] = table["method"].map(group.groupby("method")["wall_time_s"].sum() / 60)
        parts.append(table.assign(epochs=epochs))
    out = pd.concat(parts, ignore_index=True)
    cols = ["epochs", "method", "seeds", "acc_mean", "acc_std", "diff_mean", "ci_low", "ci_high",
            "significant", "cpu_min"]
    return out[[c for c in cols if c in out]]


def patience_table(records, confidence: float = 0.95):
    """Per arm of :func:`view_runs`: the gain of each longer schedule over the shortest one,
    paired by seed, with its ``confidence`` interval."""
    import pandas as pd
    shortest = records["epochs"].min()
    parts = []
    for method, group in records.groupby("method", sort=False):
        table = paired_comparison(group, baseline=shortest, label="epochs", confidence=confidence)
        parts.append(table[table["epochs"] != shortest].assign(method=method, versus=shortest))
    out = pd.concat(parts, ignore_index=True)
    return out[["method", "versus", "epochs", "seeds", "acc_mean", "diff_mean", "ci_low",
                "ci_high", "significant"]]


def soft_entropy(logits: torch.Tensor, T: float = 1.0) -> float:
    """Mean entropy, in nats, of ``softmax(logits / T)``: how soft a teacher's targets are at
    temperature ``T`` (0 for one-hot targets, ``ln(classes)`` for uniform ones)."""
    logp = F.log_softmax(logits.float() / T, 1)
    return -(logp.exp() * logp).sum(1).mean().item()


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> float:
    """Mean ``KL(p || q)`` at temperature 1 of the teacher's predictions ``p`` from the
    student's ``q``, in nats."""
    return F.kl_div(F.log_softmax(student_logits, 1), F.log_softmax(teacher_logits, 1),
                    reduction="batchmean", log_target=True).item()


def calibration(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected calibration error (percent) over ``bins`` equal-width confidence bins, and
    the reliability curve: per bin, mean confidence, accuracy and number of images."""
    probs = logits.float().softmax(1)
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(conf, edges[1:-1], right=True)   # bin i holds (edges[i], edges[i+1]]
    count = torch.bincount(which, minlength=bins).float()
    conf_sum = torch.bincount(which, weights=conf, minlength=bins)
    acc_sum = torch.bincount(which, weights=correct, minlength=bins)
    nonempty = count > 0
    mean_conf = torch.where(nonempty, conf_sum / count.clamp_min(1), torch.nan)
    mean_acc = torch.where(nonempty, acc_sum / count.clamp_min(1), torch.nan)
    ece = ((conf_sum - acc_sum).abs().sum() / len(labels)).item() * 100
    return {"ece": ece, "confidence": mean_conf.tolist(), "accuracy": mean_acc.tolist(),
            "count": count.long().tolist(), "edges": edges.tolist()}


def teacher_agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor) -> dict:
    """Accuracy, top-1 agreement with the teacher (percent), KL to the teacher (nats) and
    expected calibration error (percent) of a student's test logits."""
    return {"acc": (student_logits.argmax(1) == labels).float().mean().item() * 100,
            "agreement": (student_logits.argmax(1) == teacher_logits.argmax(1)).float().mean().item() * 100,
            "kl_to_teacher": kl_to_teacher(student_logits, teacher_logits),
            "ece": calibration(student_logits, labels)["ece"]}


def fraction_table(records, confidence: float = 0.95):
    """Per label fraction and arm: seeds, mean accuracy, the paired difference to ``ce`` with
    its ``confidence`` interval, the share of the labelled-data gap it recovers (``recovered``:
    its gain over ``ce`` at this fraction divided by the gain all labels give ``ce``; NaN at
    fraction 1 or without a run on all labels) and the CPU minutes of all its runs.
    ``records`` come from :func:`few_label_runs` (via :func:`kdutils.results.to_frame`)."""
    import pandas as pd
    records = records.assign(fraction=records["params"].map(lambda p: p["fraction"]))
    parts = []
    for fraction, group in records.groupby("fraction"):
        table = paired_comparison(group, baseline="ce", confidence=confidence)
        minutes = group.groupby("method")["wall_time_s"].sum() / 60
        table["cpu_min"] = table["method"].map(minutes)
        parts.append(table.assign(fraction=fraction,
                                  labelled=int(group["params"].iloc[0]["labelled"])))
    cols = ["fraction", "labelled", "method", "seeds", "acc_mean", "acc_std", "diff_mean",
            "ci_low", "ci_high", "significant", "recovered", "cpu_min"]
    out = pd.concat(parts, ignore_index=True)
    ce = out[out["method"] == "ce"].set_index("fraction")["acc_mean"]
    full = ce.get(1.0, float("nan"))
    gap = out["fraction"].map(full - ce).where(out["fraction"] < 1)
    out["recovered"] = (out["acc_mean"] - out["fraction"].map(ce)) / gap
    return out[[c for c in cols if c in out]]
