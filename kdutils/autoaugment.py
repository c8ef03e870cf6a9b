"""AutoAugment's CIFAR-10 policy applied to whole batches, on the device the images are on.

Introduced in chapter 9 (R1's data augmentation). The policy (Cubuk et al., 2019) is 25
sub-policies of two operations each; every image draws one sub-policy, and each of its two
operations is applied with its own probability, at a fixed magnitude whose sign is drawn
for the operations that have one. torchvision's ``AutoAugment`` does this image by image in
Python; here the draws for a whole batch are made at once (:func:`draw`) and each operation
is applied in one call to all the images that drew it (:func:`apply`): the five geometric
operations together are one gather, through a map of source pixels computed once per
operation and magnitude (with torchvision's own sampling grid); the colour operations take
one factor per image. Each operation computes what torchvision's does for the same magnitude
(the tests compare them image by image).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",            # geometric
       "Brightness", "Color", "Contrast", "Sharpness",                     # one factor each
       "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
GEOMETRIC = 5           # OPS[:5] move pixels
SIGNED = 9              # OPS[:9] are applied with a random sign, like torchvision's

# (operation, probability, magnitude bin 0..9 or None) x 2, for each of the 25 sub-policies
CIFAR10_POLICY = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitude_bins(op: str, height: int = 32, width: int = 32) -> torch.Tensor | None:
    """The 10 magnitudes of ``op`` for ``height x width`` images (None: the op has none)."""
    top = {"ShearX": 0.3, "ShearY": 0.3, "TranslateX": 150 / 331 * width,
           "TranslateY": 150 / 331 * height, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
           "Contrast": 0.9, "Sharpness": 0.9}
    if op in top:
        return torch.linspace(0.0, top[op], 10)
    if op == "Posterize":  # bits kept: 8, 8, 7, 7, 6, 6, 5, 5, 4, 4
        return (8 - torch.arange(10) / (9 / 4)).round().int()
    if op == "Solarize":   # threshold, as a fraction of 255
        return torch.linspace(1.0, 0.0, 10)
    return None


@dataclass(frozen=True)
class Draws:
    """What each of ``n`` images drew, per slot (the sub-policy's first and second
    operation): ``op`` (index into ``OPS``), ``applied`` and the signed ``magnitude``
    (0 for operations without one); all ``(n, 2)``, on the CPU."""

    op: torch.Tensor
    applied: torch.Tensor
    magnitude: torch.Tensor


@lru_cache(maxsize=None)
def _policy_tables(height: int, width: int):
    op = torch.tensor([[OPS.index(name) for name, _, _ in sub] for sub in CIFAR10_POLICY])
    prob = torch.tensor([[p for _, p, _ in sub] for sub in CIFAR10_POLICY], dtype=torch.float64)
    mag = torch.tensor([[0.0 if b is None else float(magnitude_bins(name, height, width)[b])
                         for name, _, b in sub] for sub in CIFAR10_POLICY], dtype=torch.float64)
    return op, prob, mag


def draw(n: int, generator: torch.Generator, height: int = 32, width: int = 32) -> Draws:
    """Draw sub-policies, applications and signs for ``n`` images of ``height x width``
    pixels from ``generator``."""
    g, gd = generator, generator.device
    op, prob, mag = _policy_tables(height, width)
    pick = torch.randint(len(CIFAR10_POLICY), (n,), generator=g, device=gd).cpu()
    applied = torch.rand(n, 2, generator=g, device=gd, dtype=torch.float64).cpu() <= prob[pick]
    negative = torch.rand(n, 2, generator=g, device=gd).cpu() <= 0.5
    op = op[pick]
    sign = torch.where(negative & (op < SIGNED), -1.0, 1.0).double()
    return Draws(op, applied, mag[pick] * sign)


def _inverse_affine(op: torch.Tensor, m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(n, 2, 3) inverse affine matrices in torchvision's convention (pixel coordinates
    relative to the image centre) for the geometric operation ``op[i]`` at magnitude ``m[i]``."""
    zero = torch.zeros_like(m)
    name = [OPS[k] for k in range(GEOMETRIC)]
    shear = torch.deg2rad(torch.rad2deg(torch.atan(m)))
    sx = torch.where(op == name.index("ShearX"), shear, zero)
    sy = torch.where(op == name.index("ShearY"), shear, zero)
    # torchvision rotates by -angle in its affine convention; translations are whole pixels
    rot = torch.where(op == name.index("Rotate"), torch.deg2rad(-m), zero)
    tx = torch.where(op == name.index("TranslateX"), m.trunc(), zero)
    ty = torch.where(op == name.index("TranslateY"), m.trunc(), zero)
    # shears turn about the top-left corner, rotations about the centre
    sheared = (op == name.index("ShearX")) | (op == name.index("ShearY"))
    cx = torch.where(sheared, -0.5 * w, zero)
    cy = torch.where(sheared, -0.5 * h, zero)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3)


_SOURCE_MAPS: dict = {}


def _source_map(op: int, m: float, h: int, w: int) -> torch.Tensor:
    """For geometric operation ``op`` at magnitude ``m``: the flat index of the pixel each
    output pixel takes (``h * w``: outside the image, filled with 0). Computed once per
    (op, magnitude, size) by sampling an image of pixel numbers with torchvision's grid."""
    key = (op, m, h, w)
    if key not in _SOURCE_MAPS:
        theta = _inverse_affine(torch.tensor([op]), torch.tensor([m], dtype=torch.float64), h, w)
        base = torch.ones(h, w, 3)
        base[..., 0] = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w)
        base[..., 1] = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h)[:, None]
        scale = torch.tensor([0.5 * w, 0.5 * h])
        grid = base.view(1, h * w, 3).bmm(theta.float().transpose(1, 2) / scale)
        numbers = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w)  # 0: outside
        hit = F.grid_sample(numbers, grid.view(1, h, w, 2), mode="nearest", padding_mode="zeros",
                            align_corners=False).round().long().view(-1)
        _SOURCE_MAPS[key] = torch.where(hit == 0, h * w, hit - 1)
    return _SOURCE_MAPS[key]


def _geometric(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Shear, translate or rotate each image of ``x`` (nearest pixel, zero fill), as
    torchvision's ``affine``/``rotate`` do: one gather through each image's source map."""
    n, c, h, w = x.shape
    maps = torch.stack([_source_map(o, v, h, w) for o, v in zip(op.tolist(), m.tolist())])
    flat = torch.cat([x.reshape(n, c, h * w), x.new_zeros(n, c, 1)], 2)
    return flat.gather(2, maps.to(x.device)[:, None].expand(n, c, h * w)).view(n, c, h, w)


def _factors(m: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 + m`` and ``1 - (1 + m)`` per image, rounded to float32 from float64 as
    torchvision rounds its Python-float factor and blend weight, shaped to broadcast."""
    r = (1.0 + m).view(-1, 1, 1, 1)
    return r.float().to(device), (1.0 - r).float().to(device)


def _blend(x: torch.Tensor, other: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``x * (1 + m) + other * (1 - (1 + m))`` per image, clamped to uint8 (torchvision's blend)."""
    r, a = _factors(m, x.device)
    return (x.float() * r).addcmul_(other, a).clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.float().unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _sharpness(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    out = x.float()
    # torchvision's smoothing filter, 1 on the 3x3 neighbourhood and 5 at the centre, over 13:
    # the sum is exact in float32, and a sum over 13 is never half-way between two integers
    rows = out[..., :-2, :] + out[..., 1:-1, :] + out[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    inner = out[..., 1:-1, 1:-1]   # the border keeps its pixels, as in torchvision and PIL
    blurred = box.add_(inner, alpha=4).div_(13).round_()
    inner.addcmul_(blurred.sub_(inner), _factors(m, x.device)[1])
    return out.clamp_(0, 255).to(torch.uint8)


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    bits = bits.round().long().to(x.device)
    mask = (((1 << bits) - 1) << (8 - bits)).to(torch.uint8)
    return x & mask.view(-1, 1, 1, 1)


def _solarize(x: torch.Tensor, fraction: torch.Tensor) -> torch.Tensor:
    threshold = (255 * fraction).float().to(x.device).view(-1, 1, 1, 1)
    return torch.where(x >= threshold, 255 - x, x)


def _colour_ops():
    from torchvision.transforms.v2 import functional as TF
    return {
        "Brightness": lambda x, m: _blend(x, torch.zeros((), device=x.device), m),
        "Color": lambda x, m: _blend(x, _gray(x), m),
        "Contrast": lambda x, m: _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), m),
        "Sharpness": _sharpness,
        "Posterize": _posterize,
        "Solarize": _solarize,
        "AutoContrast": lambda x, m: TF.autocontrast(x),  # already batched in torchvision
        "Equalize": lambda x, m: TF.equalize(x),
        "Invert": lambda x, m: TF.invert(x),
    }


def apply(x: torch.Tensor, draws: Draws) -> torch.Tensor:
    """Apply ``draws`` to uint8 images ``x`` of shape ``(n, 3, H, W)``: slot by slot, each
    operation once on all the images that drew it (``x`` itself is left unchanged)."""
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"AutoAugment takes uint8 RGB images (n, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if len(draws.op) != len(x):
        raise ValueError(f"{len(draws.op)} draws for {len(x)} images")
    if len(x) == 0:
        return x.clone()
    ops = _colour_ops()
    n, c, h, w = x.shape
    out = x.contiguous().clone()
    # whole images as rows of 8-byte words: moving rows is several times faster than bytes
    words = out.view(n, -1).view(torch.int64) if (c * h * w) % 8 == 0 else out.view(n, -1)
    for slot in range(2):
        op, on, m = draws.op[:, slot], draws.applied[:, slot], draws.magnitude[:, slot]
        # group 0: the geometric ops, together; group g >= 1: colour op GEOMETRIC + g - 1
        group_of = (op - GEOMETRIC + 1).clamp_(min=0)[on]
        applied = on.nonzero().squeeze(1)
        sizes = torch.bincount(group_of, minlength=len(OPS) - GEOMETRIC + 1).tolist()
        members = applied[torch.argsort(group_of, stable=True)].split(sizes)
        for g, idx in enumerate(members):
            if len(idx) == 0:
                continue
            at = idx.to(x.device)
            group = words.index_select(0, at).view(torch.uint8).view(-1, c, h, w)
            if g == 0:
                group = _geometric(group, op[idx], m[idx])
            else:
                group = ops[OPS[GEOMETRIC + g - 1]](group, m[idx])  # magnitudes: float64, CPU
            words.index_copy_(0, at, group.contiguous().view(len(idx), -1).view(words.dtype))
    return out


def auto_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """AutoAugment (CIFAR-10 policy) on a batch of uint8 ``(N, 3, H, W)`` images, each
    image with its own draw from ``generator`` (so an epoch's augmentation is reproducible);
    runs on whatever device ``x`` is on."""
    return apply(x, draw(len(x), generator, *x.shape[-2:]))


def auto_augment_per_image(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The same policy through torchvision's ``AutoAugment``, one image at a time in Python:
    the reference the batched version is measured against (``python -m kdutils.tools.bench``)."""
    from torchvision.transforms import v2
    policy = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([policy(img) for img in x])
