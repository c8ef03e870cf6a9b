"""The CPU setting chooser (appendix "Making it fast"): which precision and memory layout train
a given model fastest on this CPU, found by timing a few training steps in each.

A run asks for it by passing :func:`choose_cpu_setting` to :class:`kdutils.speed.Speed`::

    from kdutils.tools import chooser
    kd.train.fit(..., speed=kd.speed.Speed(chooser=chooser.choose_cpu_setting))

Admissible are fp32 and, only where the CPU computes it natively (:func:`cpu_native_bf16`),
bf16; NCHW and channels_last; minus the settings ``ACCURACY_EXCLUDED`` for the network
(:func:`accuracy_verdict` is the book's rule for those). The choice is cached per machine
(``machine_id()``), model and batch size, and written into the run record with the measured
rates.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import atomic_write_json
from ..results import cpu_model
from ..speed import choose_precision, freed_memory_kept, setting_name


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_native_bf16(flags: set[str]) -> bool:
    """Whether a CPU with these feature flags computes in bf16 natively (AVX512-BF16 or AMX).
    Without them PyTorch emulates bf16, many times slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


# Settings that changed accuracy on the CPU, by network: (architecture, setting name) -> why.
# The chooser never picks them. A setting enters here when a paired comparison over at least
# five seeds puts the whole 95% interval more than ACCURACY_BUDGET points below zero
# (accuracy_verdict; appendix "Making it fast" shows the measurements).
ACCURACY_EXCLUDED: dict[tuple[str, str], str] = {}
ACCURACY_BUDGET = 0.5   # points of test accuracy a faster setting may cost


def accuracy_verdict(diff_mean: float, ci_low: float, ci_high: float, seeds: int,
                     budget: float = ACCURACY_BUDGET) -> str:
    """The book's rule for a faster setting, from its paired comparison with fp32 NCHW over
    ``seeds`` seeds (mean difference and 95% interval, in points):

    - ``"excluded"``: at least five seeds and the whole interval more than ``budget`` below
      zero; the setting goes into ``ACCURACY_EXCLUDED`` for that network;
    - ``"may be a default"``: at least five seeds, the interval no lower than ``-budget``
      and the mean within ``budget`` either way (a default must not change what the book's
      runs measure, not even by a gain);
    - ``"undecided"``: anything else (the chooser may still pick it where it is faster).
    """
    if seeds < 5 or ci_low != ci_low or ci_high != ci_high:   # NaN: no interval
        return "undecided"
    if ci_high < -budget:
        return "excluded"
    if ci_low >= -budget and abs(diff_mean) <= budget:
        return "may be a default"
    return "undecided"


def cpu_candidates(amp: str, channels_last: bool | None, native_bf16: bool,
                   arch: str = "") -> list[tuple[torch.dtype | None, bool]]:
    """The CPU settings worth timing: fp32 and, with native bf16, bf16 (unless ``amp`` fixes
    the precision); NCHW and channels_last (unless ``channels_last`` fixes the layout); minus
    those ``ACCURACY_EXCLUDED`` for ``arch``."""
    if amp == "auto":
        dtypes = [None, torch.bfloat16] if native_bf16 else [None]
    else:
        dtypes = [choose_precision(amp, "cpu", native_bf16)]
    layouts = [False, True] if channels_last is None else [channels_last]
    out = [(d, cl) for d in dtypes for cl in layouts
           if (arch, setting_name(d, cl)) not in ACCURACY_EXCLUDED]
    return out or [(dtypes[0], layouts[0])]


def pick_fastest(rates: dict[str, float]) -> str:
    """The setting with the highest rate; between equal rates, the first (fp32 NCHW first)."""
    if not rates:
        raise ValueError("no setting was timed")
    return max(rates, key=lambda k: (rates[k], -list(rates).index(k)))


def step_rate(model: nn.Module, batch_size: int, image_size: int, dtype: torch.dtype | None,
              channels_last: bool, steps: int = 1, warmup: int = 1,
              min_seconds: float = 0.5) -> float:
    """Training images per second of at least ``steps`` SGD steps (after ``warmup``) on random
    images, for a copy of ``model`` on the CPU in the given precision and layout; steps are
    added until the timing lasts ``min_seconds`` (a few milliseconds of a small network
    measure the machine's noise, not the setting). A step that alone lasts longer is timed
    once: repeating a step of seconds would multiply the cost of choosing, not its precision.
    The model itself is not touched."""
    m = copy.deepcopy(model).cpu().train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m = m.to(memory_format=fmt)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=g).contiguous(memory_format=fmt)

    def one_step():
        with torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
            out = m(x)
        out = out[0] if isinstance(out, tuple) else out
        logits = out if isinstance(out, list) else [out]
        y = torch.zeros(batch_size, dtype=torch.long)
        loss = sum(F.cross_entropy(o.float(), y) for o in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        one_step()
    t0 = time.perf_counter()
    done = 0
    while done < steps or time.perf_counter() - t0 < min_seconds:
        one_step()
        done += 1
    return batch_size * done / (time.perf_counter() - t0)


def machine_id() -> str:
    """What a cached choice is valid for: CPU model, kernel capability, threads, torch, and
    whether freed memory is kept (:func:`kdutils.speed.keep_freed_memory`)."""
    return (f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__}"
            + (" | freed memory kept" if freed_memory_kept() else ""))


def _read_cache(cache: Path | None) -> dict:
    if cache is None or not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except ValueError:
        return {}


def choose_cpu_setting(model: nn.Module, batch_size: int, image_size: int = 32, *,
                       amp: str = "auto", channels_last: bool | None = None,
                       flags: set[str] | None = None, cache: str | Path | None = None,
                       steps: int = 1) -> dict:
    """The fastest admissible CPU setting for training ``model`` at ``batch_size``: what
    :class:`kdutils.speed.Speed` calls as its ``chooser``.

    Returns ``{"amp": dtype or None, "channels_last": bool, "choice": dict}``; ``choice`` (for
    the run record) names the setting, how it was chosen (``"measured"``, ``"cached"`` or
    ``"only one admissible"``), the rate of every timed setting in images/s and the seconds
    the timing took. ``cache`` is a JSON file that keeps choices per machine, model and
    batch size.
    """
    flags = cpu_flags() if flags is None else flags
    arch = getattr(model, "arch", type(model).__name__)
    candidates = cpu_candidates(amp, channels_last, cpu_native_bf16(flags), arch)
    names = [setting_name(d, cl) for d, cl in candidates]
    by_name = dict(zip(names, candidates))
    if len(candidates) == 1:
        d, cl = candidates[0]
        return {"amp": d, "channels_last": cl,
                "choice": {"setting": names[0], "by": "only one admissible"}}
    n_params = sum(p.numel() for p in model.parameters())
    key = f"{machine_id()} | {arch} ({n_params} parameters) | batch {batch_size} | {image_size} px | {', '.join(names)}"
    cache = Path(cache) if cache else None
    store = _read_cache(cache)
    if key in store:
        hit = store[key]
        d, cl = by_name[hit["setting"]]
        return {"amp": d, "channels_last": cl, "choice": {**hit, "by": "cached"}}
    t0 = time.perf_counter()
    rates = {name: step_rate(model, batch_size, image_size, d, cl, steps=steps)
             for name, (d, cl) in by_name.items()}
    best = pick_fastest(rates)
    choice = {"setting": best, "by": "measured", "rates": {k: round(v, 1) for k, v in rates.items()},
              "seconds": round(time.perf_counter() - t0, 2)}
    if cache is not None:
        store[key] = choice
        atomic_write_json(store, cache)
    d, cl = by_name[best]
    return {"amp": d, "channels_last": cl, "choice": choice}
