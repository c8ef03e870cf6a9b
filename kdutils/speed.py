"""How fast a run trains on the hardware it has (appendix "Making it fast").

:class:`Speed` holds a run's switches: autocast precision, memory layout, ``torch.compile``.
None of them is part of the recipe or the run's key. Left at ``"auto"``/``None``:

* on a CUDA GPU, bf16 where the GPU computes it natively (:func:`cuda_native_bf16`), fp16 with a
  gradient scaler before that, and channels_last;
* on a CPU, fp32 and NCHW. A ``chooser`` passed to :class:`Speed` may choose instead: with
  ``Speed(chooser=kdutils.tools.chooser.choose_cpu_setting)`` a few training steps of the run's
  own model are timed in each admissible setting (fp32 or bf16, NCHW or channels_last; bf16
  only where the CPU has native bf16) and the fastest is kept, cached per machine, model and
  batch size, and written into the run record with the measured rates. It is not the default
  yet: the layout changes a run's numerics, and a choice made from noisy timings could differ
  between two runs of the same key (or between a run and its resumption in another folder),
  which would break the loop's bitwise reproducibility until the checkpoint pins the choice.

On a CPU, :class:`Speed` can also keep the memory a training step frees for the next step
(:func:`keep_freed_memory`): off by default, on with ``keep_memory=True`` or, where the field
is left at None, with ``KD_KEEP_MEMORY=1`` (:func:`kdutils.settings.keep_memory_default`).

Every decision is a function of the device's properties, so that it is tested on any machine.
The core imports nothing from :mod:`kdutils.tools`: what measures the machine is passed in.
"""
from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .settings import keep_memory_default

AMP_CHOICES = ("auto", "bf16", "fp16", "off")

# What Speed's ``chooser`` is: choose_cpu_setting(model, batch_size, image_size, *, amp,
# channels_last, cache) -> {"amp": dtype or None, "channels_last": bool, "choice": dict}
Chooser = Callable[..., dict]


def cuda_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a CUDA GPU of compute ``capability`` computes in bf16 natively: Ampere and later
    (A100 8.0, A10/RTX 30 8.6, L4 8.9, H100 9.0); not a T4 (7.5) or a V100 (7.0)."""
    return tuple(capability) >= (8, 0)


def choose_precision(amp: str, device_type: str, native_bf16: bool) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on a device of ``device_type``, before any measurement.
    ``"auto"``: bf16 on a CUDA GPU with native bf16, fp16 (with a gradient scaler) on an older
    one, off elsewhere (on a CPU, a :class:`Speed` ``chooser`` may then pick bf16 where it is
    faster). An explicit ``"bf16"`` or ``"fp16"`` is obeyed on any device."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be 'auto', 'bf16', 'fp16' or 'off', got {amp!r}")
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    if amp == "fp16" or (amp == "auto" and not native_bf16):
        return torch.float16
    return torch.bfloat16


def choose_layout(channels_last: bool | None, device_type: str) -> bool:
    """channels_last if asked for; by default (``None``) on a CUDA GPU only (on a CPU, a
    :class:`Speed` ``chooser`` may then pick it where it is faster)."""
    return device_type == "cuda" if channels_last is None else channels_last


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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
_freed_memory_kept = False


def has_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose allocator :func:`keep_freed_memory`
    tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory(mmap_threshold: int = 256 * 2**20) -> bool:
    """Keep the memory a training step frees for the next step, instead of handing it back
    to the operating system and faulting it in again. Process-wide, once, and it cannot be
    undone; True where it applies (glibc, the C library of most Linux systems), False
    elsewhere, which is left as is. :class:`Speed` calls it only when asked (``keep_memory``).

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


@dataclass(frozen=True)
class Speed:
    """How fast a run trains; none of it is part of the recipe (appendix "Making it fast").

    ``channels_last``: NHWC memory layout for convolutions; ``None`` (default): on a CUDA GPU
    (and, with a ``chooser``, on a CPU where it measures faster). ``amp``: autocast precision;
    ``"auto"`` (default): bf16 on a CUDA GPU that computes it natively, else fp16 with a
    gradient scaler; off on a CPU (with a ``chooser``: bf16 where the CPU computes it natively
    and it measures faster). Explicit values are obeyed. ``compile``: ``torch.compile`` the
    student (pays off from a few epochs on, on a GPU).

    ``chooser``: on a CPU, what chooses the settings left to ``auto``/``None``, a function
    with the signature of :func:`kdutils.tools.chooser.choose_cpu_setting` (which times them):
    ``Speed(chooser=kdutils.tools.chooser.choose_cpu_setting)``. None by default: a choice
    made from timings could differ between a run and its resumption, and a setting becomes a
    default only when :func:`kdutils.tools.chooser.accuracy_verdict` allows it (the appendix's
    checks). ``measure`` says whether there is one.

    ``keep_memory``: on a CPU, keep the memory a step frees for the next
    (:func:`keep_freed_memory`, process-wide); None (default): as ``$KD_KEEP_MEMORY`` says
    (:func:`kdutils.settings.keep_memory_default`), else off.
    """

    channels_last: bool | None = None
    amp: str = "auto"                # "auto" | "bf16" | "fp16" | "off"
    compile: bool = False
    chooser: Chooser | None = None
    keep_memory: bool | None = None

    def __post_init__(self):
        if self.chooser is not None and not callable(self.chooser):
            raise TypeError(f"chooser must be a function like choose_cpu_setting, got {self.chooser!r}")

    @property
    def measure(self) -> bool:
        """Whether a CPU run chooses its settings by measuring (a ``chooser`` is set)."""
        return self.chooser is not None

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

    def keeps_memory(self) -> bool:
        """Whether a CPU run asks to keep freed memory: ``keep_memory``, else
        ``$KD_KEEP_MEMORY``."""
        return keep_memory_default() if self.keep_memory is None else bool(self.keep_memory)

    def resolve(self, model: nn.Module, device: torch.device, batch_size: int,
                image_size: int = 32, cache: str | Path | None = None,
                measure: bool = True) -> dict:
        """The precision and layout a run uses: ``{"amp", "channels_last", "choice"}``. On a
        CPU with a ``chooser`` (and ``measure``: False for a run that is only reloaded) and
        anything left to ``auto``/``None``, chosen by ``chooser`` (``cache``: the file it keeps
        its choices in); otherwise by the rules above (``choice`` is None). ``keep_memory``:
        whether this process keeps freed memory (on a CPU :func:`keep_freed_memory` is called
        here, before any timing, where :meth:`~kdutils.speed.Speed.keeps_memory`)."""
        self.precision(device)  # refuses an unknown amp early, on any device
        kept = device.type == "cpu" and (keep_freed_memory() if self.keeps_memory()
                                          else freed_memory_kept())
        if (device.type == "cpu" and self.chooser is not None and measure
                and (self.amp == "auto" or self.channels_last is None)):
            return {**self.chooser(model, batch_size, image_size, amp=self.amp,
                                   channels_last=self.channels_last, cache=cache),
                    "keep_memory": kept}
        return {"amp": self.precision(device), "channels_last": self.layout(device), "choice": None,
                "keep_memory": kept}
