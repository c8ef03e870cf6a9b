"""How fast a run trains on the hardware it has (appendix "Making it fast").

:class:`Speed` holds a run's switches: autocast precision, memory layout, ``torch.compile``.
None of them is part of the recipe or the run's key. Left at ``"auto"``/``None``:

* on a CUDA GPU, bf16 where the GPU computes it natively (:func:`cuda_native_bf16`), fp16 with a
  gradient scaler before that, and channels_last;
* on a CPU, fp32 and NCHW; with ``Speed(measure=True)``, :func:`choose_cpu_setting` times a
  few training steps of the run's own model in each admissible setting (fp32 or bf16, NCHW or
  channels_last; bf16 only where the CPU has native bf16, :func:`cpu_native_bf16`) and keeps
  the fastest. The choice is cached per machine, model and batch size, and written into the
  run record with the measured rates. It is not the default yet: the layout changes a run's
  numerics, and a choice made from noisy timings could differ between two runs of the same
  key (or between a run and its resumption in another folder), which would break the loop's
  bitwise reproducibility until the checkpoint pins the choice.

On a CPU, :class:`Speed` also keeps the memory a training step frees for the next step
(:func:`keep_freed_memory`), unless ``keep_memory=False``.

Every decision is a function of the device's properties, so that it is tested on any machine.
"""
from __future__ import annotations

import copy
import ctypes
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_json
from .results import cpu_model

AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of compute ``capability`` computes in bf16 natively: Ampere and later
    (A100 8.0, A10/RTX 30 8.6, L4 8.9, H100 9.0); not a T4 (7.5) or a V100 (7.0)."""
    return tuple(capability) >= (8, 0)


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


def choose_precision(amp: str, device_type: str, native_bf16: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on a device of ``device_type``, before any measurement.
    ``"auto"``: bf16 on a CUDA GPU with native bf16, fp16 (with a gradient scaler) on an older
    one, off elsewhere (on a CPU, :func:`choose_cpu_setting` may then pick bf16 where it is
    faster). An explicit ``"bf16"`` or ``"fp16"`` is obeyed on any device."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    if amp == "fp16" or (amp == "auto" and not native_bf16):
        return torch.float16
    return torch.bfloat16


def choose_layout(channels_last: bool | None, device_type: str) -> bool:
    """channels_last if asked for; by default (``None``) on a CUDA GPU only (on a CPU,
    :func:`choose_cpu_setting` may then pick it where it is faster)."""
    return device_type == "cuda" if channels_last is None else channels_last


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
      zero; the setting goes into :data:`ACCURACY_EXCLUDED` for that network;
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


def setting_name(dtype: torch.dtype | None, channels_last: bool) -> str:
    """``"fp32 NCHW"``, ``"bf16 channels_last"``, ``"fp16 NCHW"``..."""
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    return f"{precision} {'channels_last' if channels_last else 'NCHW'}"


def speed_record(setting: dict, **more) -> dict:
    """What a run record keeps of the ``setting`` it ran in (:meth:`Speed.resolve`): the
    layout, the precision (``"off"``, ``"bfloat16"``, ``"float16"``), whether freed memory was
    kept, ``more`` and, where it was chosen by measuring, the choice."""
    amp = setting["amp"]
    out = {"channels_last": setting["channels_last"],
           "amp": str(amp).replace("torch.", "") if amp else "off",
           "keep_memory": bool(setting.get("keep_memory")), **more}
    if setting["choice"]:
        out["choice"] = setting["choice"]
    return out


def recorded_setting(speed: dict | None) -> str:
    """The name (:func:`setting_name`) of a run record's ``speed`` entry; fp32 NCHW when the
    record has none (records made before it was kept)."""
    speed = speed if isinstance(speed, dict) else {}
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(speed.get("amp"))
    return setting_name(dtype, bool(speed.get("channels_last")))


def cpu_candidates(amp: str, channels_last: bool | None, native_bf16: bool,
                   arch: str = "") -> list[tuple[torch.dtype | None, bool]]:
    """The CPU settings worth timing: fp32 and, with native bf16, bf16 (unless ``amp`` fixes
    the precision); NCHW and channels_last (unless ``channels_last`` fixes the layout); minus
    those :data:`ACCURACY_EXCLUDED` for ``arch``."""
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_freed_memory_kept = False


def has_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose allocator :func:`keep_freed_memory`
    tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory(mmap_threshold: int = 256 * 2**20) -> bool:
    """Keep the memory a training step frees for the next step, instead of handing it back
    to the operating system and faulting it in again. Process-wide, once; True where it
    applies (glibc, the C library of most Linux systems), False elsewhere, which is left as is.

    glibc gives a block above a threshold (128 kB at first, raised to at most 32 MB as blocks
    are freed) a mapping of its own and unmaps it on ``free``, and it hands the top of its
    heap back to the kernel once that exceeds twice the threshold. A CPU training step frees
    and allocates the same activation sizes every step, so the blocks above 32 MB, and what
    the heap gave back, come back each step as freshly zeroed pages. Serving blocks up to
    ``mmap_threshold`` from the heap and never trimming it keeps them (glibc before 2.35
    accepts at most 32 MB, and gets that); resident memory then stays near its peak. Nothing
    numerical changes: every kernel writes the memory it is given before reading it.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if not has_glibc():
        return False
    libc = ctypes.CDLL(None)
    trimmed_never = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    own_mappings = (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                    or libc.mallopt(_M_MMAP_THRESHOLD, 4 * 2**20 * ctypes.sizeof(ctypes.c_long)))
    _freed_memory_kept = bool(trimmed_never and own_mappings)
    return _freed_memory_kept


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has taken effect in this process."""
    return _freed_memory_kept


def machine_id() -> str:
    """What a cached choice is valid for: CPU model, kernel capability, threads, torch, and
    whether freed memory is kept (:func:`keep_freed_memory`)."""
    return (f"{cpu_model()} | {torch.backends.cpu.get_cpu_capability()} | "
            f"{torch.get_num_threads()} threads | torch {torch.__version__}"
            + (" | freed memory kept" if _freed_memory_kept else ""))


def choose_cpu_setting(model: nn.Module, batch_size: int, image_size: int = 32, *,
                       amp: str = "auto", channels_last: bool | None = None,
                       flags: set[str] | None = None, cache: str | Path | None = None,
                       steps: int = 1) -> dict:
    """The fastest admissible CPU setting for training ``model`` at ``batch_size``.

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
    store = {}
    cache = Path(cache) if cache else None
    if cache is not None and cache.is_file():
        try:
            store = json.loads(cache.read_text())
        except ValueError:
            store = {}
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


@dataclass(frozen=True)
class Speed:
    """How fast a run trains; none of it is part of the recipe (appendix "Making it fast").

    ``channels_last``: NHWC memory layout for convolutions; ``None`` (default): on a CUDA GPU
    (and, with ``measure``, on a CPU where it measures faster). ``amp``: autocast precision;
    ``"auto"`` (default): bf16 on a CUDA GPU that computes it natively, else fp16 with a
    gradient scaler; off on a CPU (with ``measure``: bf16 where the CPU computes it natively
    and it measures faster). Explicit values are obeyed. ``compile``: ``torch.compile`` the
    student (pays off from a few epochs on, on a GPU). ``measure``: on a CPU, choose what is
    left to ``auto``/``None`` by timing (:func:`choose_cpu_setting`). Off by default: a choice
    made from timings could differ between a run and its resumption, and a setting becomes a
    default only when :func:`accuracy_verdict` allows it (the appendix's checks).
    ``keep_memory``: on a CPU, keep the memory a step frees for the next
    (:func:`keep_freed_memory`).
    """

    channels_last: bool | None = None
    amp: str = "auto"                # "auto" | "bf16" | "fp16" | "off"
    compile: bool = False
    measure: bool = False
    keep_memory: bool = True

    @classmethod
    def from_params(cls, P) -> "Speed":
        """The switches a Part II chapter's parameters ``P`` set: ``amp``, ``channels_last``
        and ``compile``."""
        return cls(channels_last=P.channels_last, amp=P.amp, compile=P.compile)

    def layout(self, device: torch.device) -> bool:
        """Whether to use channels_last on ``device``, before any measurement."""
        return choose_layout(self.channels_last, device.type)

    def precision(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``, before any measurement."""
        native_bf16 = (self.amp == "auto" and device.type == "cuda"
                       and cuda_native_bf16(torch.cuda.get_device_capability(device)))
        return choose_precision(self.amp, device.type, native_bf16)

    def resolve(self, model: nn.Module, device: torch.device, batch_size: int,
                image_size: int = 32, cache: str | Path | None = None,
                measure: bool = True) -> dict:
        """The precision and layout a run uses: ``{"amp", "channels_last", "choice"}``. On a
        CPU with ``self.measure`` (and ``measure``: False for a run that is only reloaded) and
        anything left to ``auto``/``None``, chosen by :func:`choose_cpu_setting`; otherwise by
        the rules above (``choice`` is None). ``keep_memory``: whether this process keeps
        freed memory (on a CPU :func:`keep_freed_memory` is called here, before any timing,
        unless ``self.keep_memory`` is False)."""
        self.precision(device)  # refuses an unknown amp early, on any device
        kept = device.type == "cpu" and (keep_freed_memory() if self.keep_memory
                                          else freed_memory_kept())
        if (device.type == "cpu" and self.measure and measure
                and (self.amp == "auto" or self.channels_last is None)):
            return {**choose_cpu_setting(model, batch_size, image_size, amp=self.amp,
                                         channels_last=self.channels_last, cache=cache),
                    "keep_memory": kept}
        return {"amp": self.precision(device), "channels_last": self.layout(device), "choice": None,
                "keep_memory": kept}
