"""The batched AutoAugment: torchvision's policy, torchvision's operations, its distribution."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from kdutils import autoaugment as A
from kdutils.data import TensorLoader


@pytest.fixture(scope="module")
def torchvision_policy():
    return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


def _images(n=48, seed=0):
    """Smooth random images (like photographs, unlike noise, they have flat regions and
    histograms with gaps, where equalise, autocontrast and sharpness do something)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=g).float()
    return F.interpolate(small, size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def _all(op: str, m: float, n: int) -> A.Draws:
    """Every image applies ``op`` at magnitude ``m`` in the first slot, nothing in the second."""
    k = A.OPS.index(op)
    applied = torch.zeros(n, 2, dtype=torch.bool)
    applied[:, 0] = True
    return A.Draws(torch.full((n, 2), k), applied, torch.full((n, 2), m, dtype=torch.float64))


def test_policy_and_magnitudes_are_torchvisions(torchvision_policy):
    assert tuple(tuple(tuple(op) for op in sub) for sub in torchvision_policy._policies) == A.CIFAR10_POLICY
    for k, op in enumerate(A.OPS):
        bins, signed = torchvision_policy._AUGMENTATION_SPACE[op]
        for h, w in ((32, 32), (24, 40)):   # translations scale with the image's own side
            ref, mine = bins(10, h, w), A.magnitude_bins(op, h, w)
            assert (ref is None and mine is None) or torch.equal(ref, mine), (op, h, w)
        assert signed == (k < A.SIGNED), op


@pytest.mark.parametrize("op", A.OPS)
def test_each_operation_computes_what_torchvision_computes(op, torchvision_policy):
    x = _images()
    bins = A.magnitude_bins(op)
    mags = [0.0] if bins is None else [float(bins[b]) for b in (1, 5, 9)]
    if A.OPS.index(op) < A.SIGNED:
        mags.append(-float(bins[7]))
    for m in mags:
        out = A.apply(x, _all(op, m, len(x)))
        ref = torch.stack([torchvision_policy._apply_image_or_video_transform(
            img, op, m, interpolation=torchvision_policy.interpolation, fill=torchvision_policy._fill)
            for img in x])
        diff = (out.int() - ref.int()).abs()
        # float blends may round a pixel the other way on another CPU: one grey level, rarely
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.002, (op, m)
        if bins is None or m == float(bins[9]):
            assert (out != x).any(), (op, m)  # at full strength it did something to these images


def test_whole_draws_compose_both_operations_image_by_image_like_torchvision(torchvision_policy):
    """Real draws (both slots, every operation, mixed in one batch) on images that are not
    square: each image is what torchvision gives when it applies the same two operations."""
    g = torch.Generator().manual_seed(7)
    small = torch.randint(0, 256, (200, 3, 6, 10), generator=g).float()
    x = F.interpolate(small, size=(24, 40), mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    d = A.draw(len(x), torch.Generator().manual_seed(8), 24, 40)
    out = A.apply(x, d)
    assert d.applied.all(1).sum() > 20 and (d.op[:, 0] != d.op[:, 1]).sum() > 100
    ty, tx = (d.magnitude[d.op == A.OPS.index(o)].abs().max().item() for o in ("TranslateY", "TranslateX"))
    assert ty == pytest.approx(150 / 331 * 24) and tx == pytest.approx(150 / 331 * 40)  # height, width
    worst = 0.0
    for i, img in enumerate(x):
        ref = img
        for slot in range(2):
            if d.applied[i, slot]:
                ref = torchvision_policy._apply_image_or_video_transform(
                    ref, A.OPS[d.op[i, slot]], float(d.magnitude[i, slot]),
                    interpolation=torchvision_policy.interpolation, fill=torchvision_policy._fill)
        diff = (out[i].int() - ref.int()).abs()
        assert diff.max() <= 1, i
        worst = max(worst, (diff > 0).float().mean().item())
    assert worst < 0.01


def test_draws_follow_the_policy_within_sampling_error():
    n = 100_000
    d = A.draw(n, torch.Generator().manual_seed(0))
    ops = torch.tensor([[A.OPS.index(o) for o, _, _ in sub] for sub in A.CIFAR10_POLICY])
    probs = torch.tensor([[p for _, p, _ in sub] for sub in A.CIFAR10_POLICY], dtype=torch.float64)
    for k, name in enumerate(A.OPS):
        p = (probs * (ops == k)).sum().item() / len(A.CIFAR10_POLICY)  # applications per image
        seen = ((d.op == k) & d.applied).sum().item()
        # an image applies an op 0, 1 or 2 times: its variance is at most 2p
        assert abs(seen - n * p) <= 4 * (2 * n * p) ** 0.5, (name, seen, n * p)  # 0 if absent
    # each sub-policy drawn uniformly: first-slot op counts follow the table
    assert abs((d.op[:, 0] == A.OPS.index("Equalize")).float().mean().item() - 5 / 25) < 0.006


def test_magnitudes_lie_on_the_policy_bins_with_random_signs():
    n = 50_000
    d = A.draw(n, torch.Generator().manual_seed(1))
    for k, name in enumerate(A.OPS):
        mine = d.magnitude[d.op == k]
        bins = A.magnitude_bins(name)
        if not any(o == name for sub in A.CIFAR10_POLICY for o, _, _ in sub):
            assert len(mine) == 0, name   # ShearX: not in the CIFAR-10 policy
            continue
        if bins is None:
            assert (mine == 0).all(), name
            continue
        allowed = {round(float(bins[b]), 6) for sub in A.CIFAR10_POLICY for o, _, b in sub if o == name}
        assert {round(v, 6) for v in mine.abs().unique().tolist()} == allowed, name
        negative = (mine < 0).float().mean().item()
        if k < A.SIGNED:
            share_positive_bins = (mine != 0).float().mean().item()
            assert abs(negative - 0.5 * share_positive_bins) < 0.02, name
        else:
            assert negative == 0, name
    # the ranges torchvision documents for CIFAR-10 images
    ranges = {"ShearY": 0.3, "TranslateX": 14.6, "Rotate": 30.0, "Brightness": 0.9, "Solarize": 1.0}
    for name, top in ranges.items():
        assert d.magnitude[d.op == A.OPS.index(name)].abs().max().item() <= top
    bits = d.magnitude[d.op == A.OPS.index("Posterize")]
    assert 4 <= bits.min().item() and bits.max().item() <= 8


def test_auto_augment_is_reproducible_per_image_and_leaves_its_input_alone():
    x = _images(64)
    before = x.clone()
    a = A.auto_augment(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(x, before)
    assert torch.equal(a, A.auto_augment(x, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, A.auto_augment(x, torch.Generator().manual_seed(2)))
    changed = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.5 < changed < 1.0  # most images, not all (some draw nothing or a zero magnitude)
    # an image's result depends on its own draw only, not on the batch it sits in
    d = A.draw(64, torch.Generator().manual_seed(3))
    whole = A.apply(x, d)
    half = A.apply(x[:32], A.Draws(d.op[:32], d.applied[:32], d.magnitude[:32]))
    assert torch.equal(whole[:32], half)


def test_auto_augment_refuses_what_it_cannot_augment():
    with pytest.raises(ValueError, match="uint8"):
        A.auto_augment(torch.rand(2, 3, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="draws"):
        A.apply(_images(4), A.draw(3, torch.Generator()))
    empty = _images(4)[:0]
    assert A.auto_augment(empty, torch.Generator()).shape == (0, 3, 32, 32)


def test_loader_epochs_repeat_their_autoaugment_and_differ_between_epochs():
    x, y = _images(64), torch.arange(64) % 10

    def epoch(e):
        tl = TensorLoader(x, y, 16, shuffle=True, augment=True, autoaugment=True, erasing=0.5, seed=4)
        tl.set_epoch(e)
        return torch.cat([b for b, _, _ in tl])
    assert torch.equal(epoch(1), epoch(1)) and not torch.equal(epoch(1), epoch(2))


def _batches(loader, epoch=3):
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_augments_whole_chunks_of_batches_and_cuts_them_like_single_batches(monkeypatch):
    """With AutoAugment the loader augments several batches at once (its per-call cost does not
    grow with the batch); the batches are the same images in the same order as batch by batch,
    the last incomplete batch included, and an epoch is still a function of (seed, epoch)."""
    x, y = _images(70), torch.arange(70) % 10
    make = lambda: TensorLoader(x, y, 16, shuffle=True, augment=True, autoaugment=True,  # noqa: E731
                                erasing=0.5, seed=4)
    assert make().chunk() == TensorLoader.AUTOAUGMENT_CHUNK // 16 > 1
    assert TensorLoader(x, y, 16, shuffle=True, augment=True, erasing=0.5).chunk() == 1  # no AutoAugment
    monkeypatch.setattr(TensorLoader, "AUTOAUGMENT_CHUNK", 48)   # 3 batches a chunk: 16+16+16, 16+6
    chunked = _batches(make())
    assert make().chunk() == 3 and [len(b) for b, _, _ in chunked] == [16, 16, 16, 16, 6]
    monkeypatch.setattr(TensorLoader, "AUTOAUGMENT_CHUNK", 16)   # one batch at a time
    single = _batches(make())
    assert [len(b) for b, _, _ in single] == [16, 16, 16, 16, 6]
    for (xc, yc, kc), (xs, ys, ks) in zip(chunked, single):
        assert torch.equal(kc, ks) and torch.equal(yc, ys)           # same images, same order
    assert not torch.equal(torch.cat([b for b, _, _ in chunked]), torch.cat([b for b, _, _ in single]))
    monkeypatch.setattr(TensorLoader, "AUTOAUGMENT_CHUNK", 48)
    again = _batches(make())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(chunked, again))   # (seed, epoch) decides


def test_an_accelerator_augments_many_batches_per_call_whatever_the_augmentation(monkeypatch):
    """On a GPU each augmentation call waits for the device (its draws are copied from the
    host), so there the loader augments ACCELERATOR_CHUNK images per call for any augmentation;
    without augmentation, or on the CPU without AutoAugment, it stays batch by batch. Cutting a
    crop-and-flip epoch into chunks keeps every batch's images and order."""
    x, y = _images(70), torch.arange(70) % 10
    crop = lambda: TensorLoader(x, y, 16, shuffle=True, augment=True, seed=4)  # noqa: E731
    plain = TensorLoader(x, y, 16, shuffle=True)
    auto = TensorLoader(x, y, 256, shuffle=True, augment=True, autoaugment=True)
    assert TensorLoader.ACCELERATOR_CHUNK // 16 > TensorLoader.AUTOAUGMENT_CHUNK // 16 > 1
    assert [crop().chunk(d) for d in ("cpu", "cuda", "mps")] == [1] + [TensorLoader.ACCELERATOR_CHUNK // 16] * 2
    assert [plain.chunk(d) for d in ("cpu", "cuda")] == [1, 1]
    assert [auto.chunk(d) for d in ("cpu", "cuda")] == [4, TensorLoader.ACCELERATOR_CHUNK // 256]
    single = _batches(crop())
    monkeypatch.setattr(TensorLoader, "chunk", lambda self, device_type=None: 3)
    chunked = _batches(crop())
    assert [len(b) for b, _, _ in chunked] == [len(b) for b, _, _ in single] == [16, 16, 16, 16, 6]
    for (xc, yc, kc), (xs, ys, ks) in zip(chunked, single):
        assert torch.equal(kc, ks) and torch.equal(yc, ys)


def test_processes_share_a_chunk_as_they_share_a_batch(monkeypatch):
    monkeypatch.setattr(TensorLoader, "AUTOAUGMENT_CHUNK", 32)
    x, y = _images(72), torch.arange(72) % 10
    make = lambda: TensorLoader(x, y, 16, shuffle=True, augment=True, autoaugment=True,  # noqa: E731
                                erasing=0.5, seed=5, drop_last=True)
    whole = _batches(make())
    parts = [_batches(make().shard(rank, 2)) for rank in (0, 1)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 4
    for w, a, b in zip(whole, *parts):
        assert torch.equal(torch.cat([a[0], b[0]]), w[0]) and torch.equal(torch.cat([a[2], b[2]]), w[2])
