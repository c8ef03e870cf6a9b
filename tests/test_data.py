"""Data: finding and decoding CIFAR-10, the tensor cache, batches and augmentation."""
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from kdutils import data as D

REAL = os.environ.get("KD_DATA_DIR")


def _image_folder(root: Path, per_class=2, classes=D.CIFAR10_CLASSES, size=32, suffix="jpg"):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g)
                Image.fromarray(img.numpy()).save(root / split / c / f"{i:04d}.{suffix}")
    return root


@pytest.mark.skipif(not REAL, reason="KD_DATA_DIR is not set and ../shared/data is absent")
def test_real_cifar10_shapes_labels_and_normalisation():
    d = D.load_cifar10(REAL, verbose=False)
    assert d.train_x.shape == (50_000, 3, 32, 32) and d.train_x.dtype == torch.uint8
    assert d.test_x.shape == (10_000, 3, 32, 32)
    assert torch.bincount(d.train_y).tolist() == [5000] * 10
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert d.source in ("cifar10-png", "cifar10-jpeg", "torchvision-cifar10")
    z = D.normalize(d.train_x[::10], d.mean, d.std)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 0.05          # CIFAR-10 statistics: mean ~ 0
    assert (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05     # and std ~ 1
    small = d.subset(1000, 500)
    assert torch.bincount(small.train_y).tolist() == [100] * 10 and len(small.test_y) == 500


def test_image_folder_is_decoded_once_and_cached(tmp_path):
    root = _image_folder(tmp_path / "jpeg")
    d = D.load_cifar10(root, verbose=False)
    assert d.source == "cifar10-jpeg" and d.train_x.shape == (20, 3, 32, 32)
    assert d.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    cache = list((root / ".kdutils-cache").glob("*.pt"))
    assert len(cache) == 1
    # Second load reads the cache: removing an image file's content would otherwise fail.
    again = D.load_cifar10(root, verbose=False)
    assert torch.equal(again.train_x, d.train_x)


def test_no_data_offline_names_the_folder_and_both_ways_out(tmp_path):
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_cifar10(tmp_path / "empty", download=False)
    msg = str(e.value)
    assert str(tmp_path / "empty") in msg and "cifar-10-batches-py" in msg and "train/<class>" in msg


def test_wrong_class_folders_are_named(tmp_path):
    root = _image_folder(tmp_path / "bad", classes=("cats", "dogs"), per_class=1)
    with pytest.raises(D.BadDataError, match="found: cats, dogs"):
        D.load_cifar10(root)


def test_missing_split_folder_is_named(tmp_path):
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(D.BadDataError, match="test"):
        D.load_cifar10(tmp_path / "half")


def test_undecodable_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "broken", per_class=1)
    bad = root / "train" / "cat" / "0000.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(D.BadDataError, match="cannot decode image .*0000.jpg"):
        D.load_cifar10(root, verbose=False)


def test_loader_covers_the_epoch_and_is_reproducible_from_seed_and_epoch():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    y = torch.arange(10)
    a = D.TensorLoader(x, y, 4, shuffle=True, seed=1)
    b = D.TensorLoader(x, y, 4, shuffle=True, seed=1)
    a.set_epoch(2), b.set_epoch(2)
    ia = torch.cat([i for _, _, i in a])
    assert sorted(ia.tolist()) == list(range(10)) and len(a) == 3
    assert torch.equal(ia, torch.cat([i for _, _, i in b]))
    b.set_epoch(3)
    assert not torch.equal(ia, torch.cat([i for _, _, i in b]))
    for xb, yb, ib in a:  # labels and images follow the indices
        assert torch.equal(yb, y[ib])


def test_random_crop_flip_is_a_padded_shift_or_its_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = D.random_crop_flip(x, g, pad=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips = 0
    for n in range(64):
        found = False
        for dy in range(9):
            for dx in range(9):
                win = padded[n, :, dy:dy + 32, dx:dx + 32]
                if torch.equal(out[n], win):
                    found = True
                elif torch.equal(out[n], win.flip(2)):
                    found, flips = True, flips + 1
        assert found
    assert 15 < flips < 49  # about half are flipped


def test_failed_download_offline_names_the_folder_and_both_ways_out(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(D.DataNotFoundError) as e:
        D.load_cifar10(tmp_path / "nothing")
    msg = str(e.value)
    assert "downloading it failed (OSError" in msg and str(tmp_path / "nothing") in msg
    assert "cifar-10-batches-py" in msg and "KD_DATA_DIR" in msg


def test_png_folder_keeps_the_pixels_and_is_named_lossless(tmp_path):
    root = _image_folder(tmp_path / "png", suffix="png")
    d = D.load_cifar10(root, verbose=False)
    assert d.source == "cifar10-png"
    with Image.open(root / "train" / "airplane" / "0000.png") as im:   # lossless: the same bytes
        assert torch.equal(d.train_x[0], torch.from_numpy(__import__("numpy").array(im)).permute(2, 0, 1))


def _archives(tmp_path, monkeypatch):
    """Six tiny archives of a PNG image folder under the real names, their hashes registered."""
    import hashlib
    import tarfile
    src = _image_folder(tmp_path / "src", per_class=1, suffix="png")
    shelf = tmp_path / "shared" / "data"
    shelf.mkdir(parents=True)
    hashes = {}
    for i, name in enumerate(D.PNG_ARCHIVES):
        with tarfile.open(shelf / name, "w:gz") as tar:   # the test split in the last, as shipped
            split = "test" if "test" in name else "train"
            for c in D.CIFAR10_CLASSES[2 * i: 2 * i + 2] if split == "train" else D.CIFAR10_CLASSES:
                tar.add(src / split / c, arcname=f"{split}/{c}")
        hashes[name] = hashlib.sha256((shelf / name).read_bytes()).hexdigest()
    monkeypatch.setattr(D, "PNG_ARCHIVES", hashes)
    return shelf


def test_the_chapters_find_the_archives_beside_the_project_and_extract_them_once(tmp_path, monkeypatch):
    shelf = _archives(tmp_path, monkeypatch)
    project = tmp_path / "book-checkout"
    project.mkdir()
    (project / "_toc.yml").write_text("root: index\n")
    monkeypatch.chdir(project)
    monkeypatch.delenv("KD_DATA_DIR", raising=False)
    assert shelf == project.parent / "shared" / "data"   # as on the machines that build the book
    found = D.find_data()
    assert found == project / ".data" / "cifar10-png" and (found / ".complete").is_file()
    d = D.load_cifar10(verbose=False)
    assert d.source == "cifar10-png" and len(d.train_y) == 10 and len(d.test_y) == 10
    assert not (project / "data").exists()          # nothing left behind where no data is
    stamp = (found / ".complete").stat().st_mtime_ns
    assert D.find_data() == found and (found / ".complete").stat().st_mtime_ns == stamp   # once
    assert D.find_data(tmp_path / "elsewhere") == tmp_path / "elsewhere"   # asked for: obeyed
    monkeypatch.setenv("KD_DATA_DIR", str(tmp_path / "env"))
    assert D.find_data() == tmp_path / "env"


def test_a_damaged_archive_is_refused_with_its_name(tmp_path, monkeypatch):
    shelf = _archives(tmp_path, monkeypatch)
    name = next(iter(D.PNG_ARCHIVES))
    (shelf / name).write_bytes(b"not the archive")
    with pytest.raises(D.BadDataError, match=f"{name} has sha256"):
        D.extract_archives(shelf, tmp_path / "out")
    assert not (tmp_path / "out" / ".complete").exists()
