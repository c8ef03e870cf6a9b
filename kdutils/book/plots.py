"""Figures used by the chapters (matplotlib; chapter 1 on)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch


def image_grid(x_uint8: torch.Tensor, labels=None, classes=None, ncols: int = 10, size: float = 1.1):
    """A grid of uint8 ``(N, 3, H, W)`` images with their class names."""
    n = len(x_uint8)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * size * 1.15),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(x_uint8[i].permute(1, 2, 0).cpu().numpy())
            if labels is not None and classes is not None:
                ax.set_title(classes[int(labels[i])], fontsize=7)
    fig.tight_layout()
    return fig


def curves(records, metric: str = "test_acc", label: str = "method", ax=None, title=None):
    """Per-epoch ``metric`` of every run in ``records`` (a DataFrame from
    :func:`kdutils.results.load_records`): the mean over seeds as a line, min-max as a band."""
    import pandas as pd
    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    for name, group in records.groupby(label, sort=False):
        rows = [pd.DataFrame(h).assign(seed=s) for h, s in zip(group["history"], group["seed"])]
        table = pd.concat(rows).groupby("epoch")[metric]
        mean, lo, hi = table.mean(), table.min(), table.max()
        line, = ax.plot(mean.index, mean.values, marker="o", ms=3,
                        label=f"{name} ({group['seed'].nunique()} seeds)")
        ax.fill_between(mean.index, lo.values, hi.values, alpha=0.2, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel({"test_acc": "test accuracy (%)", "train_loss": "training loss"}.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def accuracy_points(records, label: str = "method", ax=None, title=None):
    """Every seed's final accuracy as a dot, with the mean ± std as a bar, per method."""
    ax = ax or plt.subplots(figsize=(6, 3.2))[1]
    names = list(dict.fromkeys(records[label]))
    for i, name in enumerate(names):
        acc = records.loc[records[label] == name, "test_acc"]
        ax.scatter([i] * len(acc), acc, s=18, alpha=0.7, zorder=3)
        ax.errorbar(i + 0.15, acc.mean(), yerr=acc.std() if len(acc) > 1 else 0, fmt="D",
                    color="black", ms=4, capsize=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def experiments(runs, label: str = "experiment", ax=None, title=None):
    """One line per experiment of ``runs`` (in their order): every seed's final accuracy as a
    dot and the mean as a bar, labelled on the left; readable at page width."""
    names = list(dict.fromkeys(runs[label]))
    ax = ax or plt.subplots(figsize=(9, 0.34 * len(names) + 1.1))[1]
    for i, name in enumerate(names):
        acc = runs.loc[runs[label] == name, "test_acc"]
        ax.scatter(acc, [i] * len(acc), s=16, alpha=0.6, color="C0", zorder=3)
        ax.plot([acc.mean()] * 2, [i - 0.3, i + 0.3], color="black", lw=2)
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("final test accuracy (%): a dot per seed, a bar at the mean")
    ax.grid(alpha=0.3, axis="x")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def accuracy_vs_time(runs: dict, ax=None, title=None):
    """Test accuracy after every epoch against the cumulative training minutes, one line per
    teacher: ``runs`` maps a label to a run record (its ``history`` has ``seconds``)."""
    ax = ax or plt.subplots(figsize=(6, 3.6))[1]
    for label, record in runs.items():
        minutes, acc = [], []
        elapsed = 0.0
        for row in record["history"]:
            elapsed += row["seconds"]
            minutes.append(elapsed / 60)
            acc.append(row["test_acc"])
        line, = ax.plot(minutes, acc, marker="o", ms=3, label=label)
        if record.get("test_acc") != acc[-1]:  # e.g. the final accuracy with test-time augmentation
            ax.scatter([minutes[-1]], [record["test_acc"]], marker="*", s=90, color=line.get_color(),
                       zorder=4, label=f"{label}, final (test-time augmentation)")
    return _finish(ax, "training time (minutes)", "test accuracy (%)", title, "lower right")


def label_fractions(table, ax=None, title=None):
    """Mean accuracy against the fraction of labelled images (log scale), one line per arm,
    from :func:`kdutils.book.regimes.fraction_table`; bars show the spread (std) over seeds."""
    ax = ax or plt.subplots(figsize=(6, 3.8))[1]
    names = {"ce": "cross-entropy on the labelled images",
             "kd": "KD on the labelled images",
             "kd_unlabelled": "KD on all images, labels on the fraction",
             "soft_only": "soft targets on all images, no label",
             "pseudo_label": "teacher's top class where no label"}
    for i, (method, group) in enumerate(table.groupby("method", sort=False)):
        group = group.sort_values("fraction")
        ax.errorbar(group["fraction"] * 100, group["acc_mean"], yerr=group["acc_std"].fillna(0),
                    marker="os^Dv"[i % 5], ms=5, capsize=3, color=f"C{i}",
                    label=names.get(method, method))
    ax.set_xscale("log")
    ticks = sorted(set(table["fraction"] * 100))
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    return _finish(ax, "labelled training images", "test accuracy (%)", title, "lower right")


def accuracy_by_epochs(table, ax=None, title=None):
    """Mean accuracy against the number of epochs, one line per arm, from
    :func:`kdutils.book.regimes.view_table`; bars show the spread (std) over seeds."""
    ax = ax or plt.subplots(figsize=(5.5, 3.8))[1]
    names = {"ce": "cross-entropy", "kd": "KD, teacher on the student's view (consistent)",
             "kd_inconsistent": "KD, teacher on the plain image (inconsistent)"}
    for i, (method, group) in enumerate(table.groupby("method", sort=False)):
        group = group.sort_values("epochs")
        ax.errorbar(group["epochs"], group["acc_mean"], yerr=group["acc_std"].fillna(0),
                    marker="os^Dv"[i % 5], ms=5, capsize=3, color=f"C{i}",
                    label=names.get(method, method))
    ax.set_xticks(sorted(set(table["epochs"])))
    return _finish(ax, "epochs", "test accuracy (%)", title, "lower right")


def grid_heatmap(table, value: str = "diff_mean", ax=None, title=None):
    """A heatmap of ``value`` over temperature (rows) and soft-target weight (columns), from
    :func:`kdutils.book.regimes.grid_table`; each cell also prints its 95% interval, and cells
    whose interval excludes zero are framed."""
    import numpy as np
    grid = table.pivot(index="T", columns="alpha", values=value)
    ax = ax or plt.subplots(figsize=(1.6 * grid.shape[1] + 2.2, 0.8 * grid.shape[0] + 1.4))[1]
    span = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    image = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-span, vmax=span, aspect="auto")
    for row in table.itertuples():
        i, j = grid.index.get_loc(row.T), grid.columns.get_loc(row.alpha)
        text = f"{getattr(row, value):+.2f}"
        if value == "diff_mean":
            text += f"\n[{row.ci_low:+.1f}, {row.ci_high:+.1f}]"
            if row.ci_low > 0 or row.ci_high < 0:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2, color="black"))
        dark = abs(getattr(row, value)) > 0.6 * span
        ax.text(j, i, text, ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    ax.set_xticks(range(grid.shape[1]), [f"{a:g}" for a in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{t:g}" for t in grid.index])
    ax.set_xlabel("alpha (weight of the soft-target term)")
    ax.set_ylabel("temperature T")
    ax.figure.colorbar(image, ax=ax, label="KD - CE (points)" if value == "diff_mean" else value)
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def reliability(curves: dict, ax=None, title=None):
    """Reliability diagram: accuracy against confidence per bin, one line per model;
    ``curves`` maps a label to :func:`kdutils.book.regimes.calibration`'s result."""
    ax = ax or plt.subplots(figsize=(4.4, 4.2))[1]
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="perfectly calibrated")
    for i, (label, c) in enumerate(curves.items()):
        pts = [(x, y) for x, y, n in zip(c["confidence"], c["accuracy"], c["count"]) if n > 0]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=f"C{i}",
                label=f"{label} (ECE {c['ece']:.1f}%)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _finish(ax, "confidence (top-1 probability)", "accuracy", title, "upper left")


def _finish(ax, xlabel: str, ylabel: str, title, legend_loc: str):
    """Axis labels, a light grid, a small legend and the title shared by the figures above."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)
    if title:
        ax.set_title(title, fontsize=10)
    return ax
