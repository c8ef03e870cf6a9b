"""CIFAR-10 as decoded uint8 tensors, cached on disk, and a loader that augments in batches.

Introduced in chapter 1. Images are decoded once into a ``uint8`` tensor cache; every batch
is then cut from those tensors, augmented with batched tensor operations (random crop with
padding, horizontal flip) and normalised, all on the training device. Nothing is decoded
per epoch, and the batch order and augmentation of every epoch follow from ``(seed, epoch)``.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import settings
from .autoaugment import auto_augment  # noqa: F401  (part of the data path: kd.data.auto_augment)
from .checkpoint import atomic_save, load_checkpoint

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel statistics of the CIFAR-10 training set (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# What R5 normalised with: ImageNet's statistics, not CIFAR-10's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CACHE_VERSION = 1


class DataNotFoundError(FileNotFoundError):
    """No usable copy of the dataset was found and it could not be downloaded."""


class BadDataError(ValueError):
    """The data folder exists but its content is not what it should be."""


@dataclass
class ImageData:
    """A dataset held as tensors: images ``uint8 (N, 3, H, W)``, labels ``int64 (N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str  # what the data was read from, written into every run record
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    folder: str = ""
    val_x: torch.Tensor | None = None  # a held-out part of the training set (see holdout)
    val_y: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"ImageData(source={self.source!r}, train={tuple(self.train_x.shape)}, "
                f"test={tuple(self.test_x.shape)}, classes={len(self.classes)})")

    def subset(self, train_size: int | None = None, test_size: int | None = None) -> "ImageData":
        """The first ``size // num_classes`` images of every class (deterministic)."""
        tx, ty = _stratified(self.train_x, self.train_y, train_size, len(self.classes))
        vx, vy = _stratified(self.test_x, self.test_y, test_size, len(self.classes))
        return ImageData(tx, ty, vx, vy, self.classes, self.source, self.mean, self.std,
                         self.folder)

    def holdout(self, val_size: int, seed: int = 0) -> "ImageData":
        """Move ``val_size`` training images (a seeded random choice) into a validation set.

        Model selection (which epoch to keep, which weight to use) must look at these, never
        at the test set and never at training accuracy. The test set is left untouched.
        """
        n = len(self.train_y)
        if not 0 < val_size < n:
            raise ValueError(f"val_size must be between 1 and {n - 1} (the training set has "
                             f"{n} images), got {val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, train = perm[:val_size].sort().values, perm[val_size:].sort().values
        return ImageData(self.train_x[train], self.train_y[train], self.test_x, self.test_y,
                         self.classes, self.source, self.mean, self.std, self.folder,
                         val_x=self.train_x[val], val_y=self.train_y[val])


def _stratified(x, y, size, num_classes):
    if size is None or size >= len(y):
        return x, y
    per_class = max(1, size // num_classes)
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(num_classes)])
    keep = keep.sort().values
    return x[keep], y[keep]


# ------------------------------------------------------------------ finding the data

# CIFAR-10's original pixels as six PNG archives (file name: sha256), for machines without a
# network: beside the project in data/ or ../shared/data/, extracted once into .data/cifar10-png/.
PNG_ARCHIVES = {
    "cifar10-png-train-1.tar.gz": "26241b8c9323c086055844d6b1955dc87c99934c348d10b2c360f3428d25f8a9",
    "cifar10-png-train-2.tar.gz": "22dbeb3e18920dd15f97f0bedc316aab9f0a08e67cfc358af507f000765bf55f",
    "cifar10-png-train-3.tar.gz": "9c94a92e48aad8dd5a03f7db699e5b6bc5c892cd2f3a4d01e55fc73cd181f66b",
    "cifar10-png-train-4.tar.gz": "0c1307a06367c00a3bd44df94f9bcf640d4a0cace2d4ceeab86d55312084ae36",
    "cifar10-png-train-5.tar.gz": "970ea6661a13282c76a77f54de2c3e06b5d8d56701ebed1deff1468256b1d68c",
    "cifar10-png-test.tar.gz": "0d38ebd1898569b2bb9ff3294c5cad99863e9052017042fdb67bb92bd5496dc5",
}


def find_data(data_dir: str | Path | None = None) -> Path:
    """The folder CIFAR-10 is read from, the same for a chapter, a test and the command line:
    ``data_dir``, else ``$KD_DATA_DIR``, else the lossless PNG archives (``PNG_ARCHIVES``)
    in ``<project>/data/`` or ``<project>/../shared/data/``, extracted once into
    ``<project>/.data/cifar10-png/``, else ``<project>/data/`` (where torchvision downloads)."""
    if data_dir is not None or os.environ.get(settings.DATA_VAR):
        return settings.data_dir(data_dir)
    root = settings.project_root()
    for folder in (root / "data", root.parent / "shared" / "data"):
        if all((folder / name).is_file() for name in PNG_ARCHIVES):
            return extract_archives(folder, root / ".data" / "cifar10-png")
    return settings.data_dir()


def extract_archives(folder: Path, dest: Path) -> Path:
    """Check the PNG archives in ``folder`` against their sha256 and extract them into ``dest``
    (once: a later call finds ``dest`` complete; a file lock makes a second process wait)."""
    import tarfile
    from filelock import FileLock
    done = dest / ".complete"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if done.is_file():
            return dest
        for name, expected in PNG_ARCHIVES.items():
            digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            if digest != expected:
                raise BadDataError(f"{folder / name} has sha256 {digest}, not {expected}: "
                                   "the archive is damaged or another file; replace it")
        for name in PNG_ARCHIVES:
            with tarfile.open(folder / name) as tar:
                tar.extractall(dest, filter="data")
        done.write_text("".join(f"{n} {d}\n" for n, d in PNG_ARCHIVES.items()))
    return dest


def load_cifar10(data_dir: str | Path | None = None, *, download: bool = True,
                 train_size: int | None = None, test_size: int | None = None,
                 verbose: bool = True) -> ImageData:
    """Load CIFAR-10 as uint8 tensors from :func:`find_data`'s folder.

    Looks there, in order, for torchvision's ``cifar-10-batches-py/``; for an ImageFolder pair
    ``train/<class>/`` + ``test/<class>/`` (the lossless PNG copy: ``data_source``
    ``cifar10-png``; the JPEG copy: ``cifar10-jpeg``); otherwise downloads with torchvision.
    Decoded images are cached in ``.kdutils-cache/`` there, so later runs skip decoding.
    """
    root = find_data(data_dir)
    if (root / "cifar-10-batches-py").is_dir():
        data = _cached(root, "torchvision-cifar10", _fingerprint_dir(root / "cifar-10-batches-py"),
                       lambda: _read_torchvision(root), verbose)
    elif (root / "train").is_dir() or (root / "test").is_dir():
        split_dirs = [root / "train", root / "test"]
        missing = [str(d) for d in split_dirs if not d.is_dir()]
        if missing:
            raise BadDataError(f"{root} holds an image-folder dataset but lacks {', '.join(missing)}; "
                               "it needs both train/<class>/ and test/<class>/")
        files = {s: _image_files(root / s) for s in ("train", "test")}
        suffixes = {p.suffix.lower() for fs in files.values() for _, p in fs}
        source = ("cifar10-png" if suffixes == {".png"} else "cifar10-jpeg"
                  if suffixes <= {".jpg", ".jpeg"} else f"imagefolder:{root.name}")
        fp = _fingerprint_files([p for fs in files.values() for _, p in fs])
        data = _cached(root, source, fp, lambda: _read_image_folder(root, files), verbose)
    else:
        data = _download(root, download, verbose)
    data.folder = str(root)
    return data.subset(train_size, test_size)


def _download(root: Path, download: bool, verbose: bool) -> ImageData:
    ways_out = (
        f"Either put torchvision's CIFAR-10 (the folder cifar-10-batches-py/) in {root}, "
        f"or an image-folder copy as {root}/train/<class>/*.png and {root}/test/<class>/*.png "
        "(for example the book's PNG archives, extracted there); or set KD_DATA_DIR (or the "
        "data_dir parameter) to a folder that holds either.")
    if not download:
        raise DataNotFoundError(f"No CIFAR-10 found in {root}. {ways_out}")
    import torchvision
    try:
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
        torchvision.datasets.CIFAR10(root=str(root), train=False, download=True)
    except Exception as e:  # no network, proxy, disk full...
        raise DataNotFoundError(
            f"No CIFAR-10 found in {root}, and downloading it failed "
            f"({type(e).__name__}: {e}). {ways_out}") from None
    return _cached(root, "torchvision-cifar10", _fingerprint_dir(root / "cifar-10-batches-py"),
                   lambda: _read_torchvision(root), verbose)


def _read_torchvision(root: Path) -> dict:
    import torchvision
    out = {}
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.CIFAR10(root=str(root), train=train, download=False)
        out[f"{split}_x"] = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        out[f"{split}_y"] = torch.tensor(ds.targets, dtype=torch.int64)
    return out


def _image_files(split_dir: Path) -> list[tuple[int, Path]]:
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if tuple(found) != CIFAR10_CLASSES:
        raise BadDataError(
            f"{split_dir} should hold one folder per CIFAR-10 class: {', '.join(CIFAR10_CLASSES)}; "
            f"found: {', '.join(found) or 'none'}")
    files = []
    for label, name in enumerate(CIFAR10_CLASSES):
        names = sorted(os.listdir(split_dir / name))
        if not names:
            raise BadDataError(f"{split_dir / name} holds no images")
        files += [(label, split_dir / name / f) for f in names]
    return files


def _read_image_folder(root: Path, files: dict) -> dict:
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    out = {}
    for split, items in files.items():
        images = []
        for _, path in tqdm(items, desc=f"decoding {split}", mininterval=2, leave=False):
            try:
                with Image.open(path) as im:
                    img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
            except Exception as e:
                raise BadDataError(f"cannot decode image {path} ({type(e).__name__}: {e}); "
                                   "remove or replace the file") from None
            if img.shape != (3, 32, 32):
                raise BadDataError(f"image {path} is {tuple(img.shape[1:])} pixels; "
                                   "CIFAR-10 images are 32x32")
            images.append(img)
        out[f"{split}_x"] = torch.stack(images)
        out[f"{split}_y"] = torch.tensor([label for label, _ in items], dtype=torch.int64)
    return out


def _fingerprint_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.parent.name}/{p.name}:{st.st_size}\n".encode())
    return h.hexdigest()[:16]


def _fingerprint_dir(folder: Path) -> str:
    return _fingerprint_files(sorted(p for p in folder.iterdir() if p.is_file()))


def _cached(root: Path, source: str, fingerprint: str, read, verbose: bool) -> ImageData:
    cache = root / ".kdutils-cache" / f"cifar10-{source.replace(':', '_')}.pt"
    tensors = None
    if cache.is_file():
        try:
            blob = load_checkpoint(cache)
            if blob.get("version") == _CACHE_VERSION and blob.get("fingerprint") == fingerprint:
                tensors = blob["tensors"]
        except Exception:
            tensors = None  # a stale or damaged cache is rebuilt from the images
    if tensors is None:
        if verbose:
            print(f"Decoding CIFAR-10 from {settings.shown_path(root)} once; the tensors are cached "
                  f"in {settings.shown_path(cache.parent)}")
        tensors = read()
        try:
            atomic_save({"version": _CACHE_VERSION, "fingerprint": fingerprint,
                         "tensors": tensors}, cache)
        except OSError as e:  # a read-only data folder still works, only slower next time
            if verbose:
                print(f"(could not write the cache {settings.shown_path(cache)}: {e.strerror or e})")
    return ImageData(tensors["train_x"], tensors["train_y"], tensors["test_x"], tensors["test_y"],
                     CIFAR10_CLASSES, source)


# ------------------------------------------------------------------ batches

def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images -> float, scaled to [0, 1], minus ``mean``, divided by ``std`` per channel."""
    mean = torch.tensor(mean, device=x_uint8.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=x_uint8.device).view(1, -1, 1, 1)
    return x_uint8.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, *,
                     size: int | None = None, flip: bool = True) -> torch.Tensor:
    """Batched RandomCrop(size, padding=pad) + RandomHorizontalFlip on ``(N, C, H, W)``.

    Each image gets its own offset on both axes (zero padding, as torchvision's RandomCrop)
    and, with ``flip``, is mirrored with probability 1/2. ``size`` is the side of the crop
    (default: the input's, so offsets lie in ``[0, 2 * pad]``); a smaller ``size`` with
    ``pad=0`` cuts random crops from images padded beforehand (e.g. by reflection).
    """
    n, _, h, w = x.shape
    size = size or h
    if size > h + 2 * pad:
        raise ValueError(f"crop size {size} exceeds the padded image ({h + 2 * pad} px)")
    g, gd = generator, generator.device
    dy = torch.randint(0, h + 2 * pad - size + 1, (n,), generator=g, device=gd)
    dx = torch.randint(0, w + 2 * pad - size + 1, (n,), generator=g, device=gd)
    mirror = torch.rand(n, generator=g, device=gd) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return crop_flip(x, dy, dx, mirror, pad, size)


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, mirror: torch.Tensor,
              pad: int = 4, size: int | None = None) -> torch.Tensor:
    """Crop image ``i`` of ``(N, C, H, W)`` at offset ``(dy[i], dx[i])`` of its zero-padded
    copy and mirror it where ``mirror[i]``: the deterministic half of :func:`random_crop_flip`."""
    dev = x.device
    n, c = x.shape[:2]
    size = size or x.shape[-2]
    if n == 0:
        return x.new_empty(0, c, size, size)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad)) if pad else x
    width = padded.shape[-1]
    rows = dy.to(dev)[:, None] + torch.arange(size, device=dev)           # (n, size)
    cols = dx.to(dev)[:, None] + torch.arange(size, device=dev)           # (n, size)
    cols = torch.where(mirror.to(dev)[:, None], cols.flip(1), cols)
    # one gather per batch: the flat position, in its padded image, of every output pixel;
    # pixels stay channel-interleaved (the result is channels_last in memory, as it always was:
    # a convolution's floating-point sums depend on the layout it is given)
    src = (rows[:, :, None] * width + cols[:, None, :]).view(n, size * size, 1)
    pixels = padded.permute(0, 2, 3, 1).reshape(n, -1, c)
    out = pixels.gather(1, src.expand(n, size * size, c)).view(n, size, size, c)
    return out.permute(0, 3, 1, 2)


@dataclass(frozen=True)
class FixedViews:
    """``views`` fixed crop-and-flip views of each of ``n`` images (Fast Knowledge
    Distillation): offsets ``dy, dx`` and ``mirror`` of shape ``(views, n)``, drawn once from
    ``seed``. A frozen teacher's outputs on every view are computed once; each epoch the
    student sees one view per image, drawn from ``(run seed, epoch)``, and the teacher's
    output for exactly that view is looked up: consistent teaching at the cost of a table.
    """

    dy: torch.Tensor
    dx: torch.Tensor
    mirror: torch.Tensor
    pad: int = 4

    @staticmethod
    def draw(n: int, views: int, seed: int = 0, pad: int = 4) -> "FixedViews":
        if views < 1:
            raise ValueError(f"views must be >= 1, got {views}")
        g = torch.Generator().manual_seed(20_011 + seed)
        dy = torch.randint(0, 2 * pad + 1, (views, n), generator=g)
        dx = torch.randint(0, 2 * pad + 1, (views, n), generator=g)
        return FixedViews(dy, dx, torch.rand(views, n, generator=g) < 0.5, pad)

    @property
    def views(self) -> int:
        return self.dy.shape[0]

    def apply(self, x: torch.Tensor, idx: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The images ``x`` (dataset rows ``idx``) in their views ``view``."""
        idx, view = idx.cpu(), view.cpu()
        return crop_flip(x, self.dy[view, idx], self.dx[view, idx], self.mirror[view, idx], self.pad)


def random_erasing(x: torch.Tensor, generator: torch.Generator, p: float = 0.5,
                   scale=(0.02, 0.33), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Batched RandomErasing(p, scale, ratio, value=0) on normalised ``(N, C, H, W)`` images.

    Each image, with probability ``p``, gets one rectangle of area ``scale`` times the image
    and aspect ratio ``ratio`` (log-uniform) set to 0, as torchvision's RandomErasing does
    (which retries up to 10 times when the rectangle does not fit; here the size is clipped).
    """
    n, _, h, w = x.shape
    g, gd = generator, generator.device
    area = h * w * torch.empty(n, device=gd).uniform_(*scale, generator=g)
    logr = torch.empty(n, device=gd).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g)
    eh = (area * logr.exp()).sqrt().round().clamp(1, h).long()
    ew = (area / logr.exp()).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, device=gd, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, device=gd, generator=g) * (w - ew + 1)).long()
    on = torch.rand(n, device=gd, generator=g) < p
    dev = x.device
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    top, left, eh, ew, on = (t.to(dev) for t in (top, left, eh, ew, on))
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])        # (n, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])      # (n, w)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & on[:, None, None]  # (n, h, w)
    # x.masked_fill(mask, 0.0), several times faster on a CPU: a contiguous copy as masked_fill
    # returns, and adding 0.0 turns the -0.0 of a negative pixel times 0 into masked_fill's +0.0
    out = x.clone(memory_format=torch.contiguous_format)
    return out.mul_((~mask)[:, None].to(x.dtype)).add_(0.0)


class TensorLoader:
    """Batches from uint8 image tensors held on ``device``.

    Yields ``(images, labels, indices)``: normalised float images, int64 labels, and the
    indices of the samples in the dataset (used to look up pre-computed teacher outputs; with
    ``views``, the index ``view * N + image`` of the image's view this epoch).
    Call :meth:`~kdutils.data.TensorLoader.set_epoch` before each epoch: the order and the augmentation of an epoch
    are a function of ``(seed, epoch)`` alone, so a resumed run sees the same batches.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
                 augment: bool = False, seed: int = 0, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                 device: str | torch.device = "cpu", drop_last: bool = False,
                 channels_last: bool = False, autoaugment: bool | Callable = False,
                 erasing: float = 0.0, views: FixedViews | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.seed, self.mean, self.std = seed, mean, std
        self.drop_last, self.channels_last = drop_last, channels_last
        self.autoaugment, self.erasing, self.views = autoaugment, erasing, views
        self.epoch = 0
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> "TensorLoader":
        """Make this process's loader one of ``world`` (under torchrun).

        A shuffled (training) loader cuts every global batch of ``batch_size`` images into
        ``world`` equal, disjoint parts and yields part ``rank``; the order and augmentation
        are those of the single-process loader with the same seed, so the processes together
        see exactly its batches (the last, incomplete global batch is dropped). A fixed-order
        (evaluation) loader yields every ``world``-th image starting at ``rank``.
        """
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        if self.shuffle and self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of the number of "
                             f"processes ({world}): it is the global batch, split evenly")
        self.rank, self.world = rank, world
        return self

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order and augmentation the next pass draws (from the seed and it)."""
        self.epoch = epoch

    def _size(self) -> int:
        n = len(self.y)
        if self.world > 1 and not self.shuffle:
            n = len(range(self.rank, n, self.world))
        return n

    def __len__(self) -> int:
        n = self._size()
        drop = self.drop_last or (self.world > 1 and self.shuffle)
        return n // self.batch_size if drop else -(-n // self.batch_size)

    # AutoAugment costs the same set of small tensor operations per call, whatever the number of
    # images: it is applied to this many images at once (whole batches), and the batches are
    # cut from them.
    AUTOAUGMENT_CHUNK = 1024
    # On a GPU every augmentation call also copies its random draws from host memory, and a copy
    # from pageable host memory first waits for the device to finish the work queued before it:
    # the loop cannot queue the next steps until the device is idle. Augmenting this many images
    # per call leaves one such wait every few dozen steps instead of one per batch.
    ACCELERATOR_CHUNK = 16384

    def chunk(self, device_type: str | None = None) -> int:
        """How many batches are augmented together on ``device_type`` (default: the loader's).

        On a CPU: one, or with AutoAugment as many as make :data:`AUTOAUGMENT_CHUNK` images.
        On an accelerator, with any augmentation: as many as make :data:`ACCELERATOR_CHUNK`.
        The draws are still one per image, from the epoch's generator, so an epoch's batches
        stay a function of ``(seed, epoch)`` and of the chunk; the images of each batch and
        their order do not depend on the chunk at all.
        """
        kind = device_type or self.device.type
        augments = self.augment or bool(self.autoaugment) or self.erasing > 0 or self.views is not None
        if kind != "cpu" and augments:
            return max(1, self.ACCELERATOR_CHUNK // self.batch_size)
        return max(1, self.AUTOAUGMENT_CHUNK // self.batch_size) if self.autoaugment else 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.y)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        # with fixed views: the view of every image this epoch (its row in the teacher's table)
        view = None if self.views is None else torch.randint(0, self.views.views, (n,), generator=g)
        if self.world > 1 and not self.shuffle:
            order = order[self.rank::self.world]
        order = order.to(self.device)
        # under torchrun a global batch is augmented whole, then each process takes its part
        size = self.batch_size // self.world if self.world > 1 and self.shuffle else self.batch_size
        offset = self.rank * size if self.world > 1 and self.shuffle else 0
        batches, chunk = len(self), self.chunk()
        for first in range(0, batches, chunk):
            last = min(first + chunk, batches)
            idx = order[first * self.batch_size:last * self.batch_size]
            xs, keys = self._augmented(idx, g, view, n)
            for b in range(last - first):
                lo = b * self.batch_size + offset
                hi = min(lo + size, len(idx))
                xb = xs[lo:hi]
                if self.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                yield xb, self.y[idx[lo:hi]], keys[lo:hi]

    def _augmented(self, idx: torch.Tensor, g: torch.Generator, view, n: int):
        """The normalised (and augmented) images of dataset rows ``idx``, and their keys."""
        xb = self.x.index_select(0, idx)   # far faster than self.x[idx] on a CPU
        key = idx
        if view is not None:
            v = view[idx.cpu()]
            xb = self.views.apply(xb, idx, v)
            key = v.to(idx.device) * n + idx   # row of (view, image) in the teacher's table
        if self.augment:
            xb = random_crop_flip(xb, g)
        if self.autoaugment:  # True: the batched AutoAugment; a function: that one instead
            xb = (self.autoaugment if callable(self.autoaugment) else auto_augment)(xb, g)
        xb = normalize(xb, self.mean, self.std)
        if self.erasing > 0:
            xb = random_erasing(xb, g, p=self.erasing)
        return xb, key


def loaders(data: ImageData, batch_size: int, *, seed: int, augment: bool = False,
            device="cpu", eval_batch_size: int = 1000, channels_last: bool = False,
            autoaugment: bool = False, erasing: float = 0.0, views: FixedViews | None = None):
    """The training loader (shuffled) and the test loader (fixed order, no augmentation)."""
    train = TensorLoader(data.train_x, data.train_y, batch_size, shuffle=True, augment=augment,
                         seed=seed, mean=data.mean, std=data.std, device=device,
                         channels_last=channels_last, autoaugment=autoaugment, erasing=erasing,
                         views=views)
    test = TensorLoader(data.test_x, data.test_y, eval_batch_size, shuffle=False,
                        mean=data.mean, std=data.std, device=device, channels_last=channels_last)
    return train, test


# ------------------------------------------------------------------ ImageNet-sized datasets (R3, R4)

def load_dataset(name: str, data_dir=None, *, image_size: int = 32, train_size: int | None = None,
                 test_size: int | None = None, download: bool = True) -> ImageData:
    """CIFAR-10 (32 px), STL10 or Imagenette as uint8 tensors at ``image_size`` pixels.

    STL10 (96 px, 5,000 labelled training and 8,000 test images) and Imagenette (10 ImageNet
    classes) come through torchvision with ``download=True``; each image is resized (shorter
    side to ``image_size * 8/7``) and centre-cropped to ``image_size`` once, at load time, as
    R3/R4's evaluation transforms do, and normalised with ImageNet's statistics (what a
    pretrained teacher expects).
    """
    if name == "cifar10":
        if image_size != 32:
            raise ValueError(f"CIFAR-10 images are 32 px; image_size={image_size} would only "
                             "upsample them. Use image_size=32, or dataset 'stl10'/'imagenette'")
        return load_cifar10(data_dir, download=download, train_size=train_size, test_size=test_size)
    if name not in ("stl10", "imagenette"):
        raise ValueError(f"unknown dataset {name!r}; known: cifar10, stl10, imagenette")
    import torchvision
    from torchvision.transforms import v2
    root = settings.data_dir(data_dir)
    resize = v2.Compose([v2.PILToTensor(), v2.Resize(round(image_size * 8 / 7), antialias=True),
                         v2.CenterCrop(image_size)])
    splits = {}
    try:
        for split, tv_split in (("train", "train"), ("test", "test" if name == "stl10" else "val")):
            if name == "stl10":
                ds = torchvision.datasets.STL10(str(root), split=tv_split, download=download)
            else:
                ds = torchvision.datasets.Imagenette(str(root), split=tv_split, size="320px",
                                                     download=download and not (root / "imagenette2-320").is_dir())
            splits[split] = ds
    except Exception as e:
        raise DataNotFoundError(
            f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: {e}). "
            f"Download it on a machine with internet (torchvision.datasets."
            f"{'STL10' if name == 'stl10' else 'Imagenette'}(root, download=True)) and point "
            "data_dir / KD_DATA_DIR at that folder.") from None
    from tqdm.auto import tqdm
    tensors = {}
    for split, ds in splits.items():
        xs, ys = [], []
        for img, label in tqdm(ds, desc=f"{name} {split}", mininterval=2, leave=False):
            xs.append(resize(img.convert("RGB")))
            ys.append(int(label))
        tensors[split] = (torch.stack(xs), torch.tensor(ys, dtype=torch.int64))
    classes = tuple(getattr(splits["train"], "classes", [str(i) for i in range(10)]))
    classes = tuple(c if isinstance(c, str) else c[0] for c in classes)
    data = ImageData(*tensors["train"], *tensors["test"], classes, f"torchvision-{name}",
                     IMAGENET_MEAN, IMAGENET_STD, str(root))
    return data.subset(train_size, test_size)
