"""Part II building blocks: CIFAR ResNets, the multi-exit ResNet18, the BYOT loss, hooks."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

from kdutils import hooks, losses, models
from kdutils.checkpoint import CheckpointError, load_state_dict_strict


def test_cifar_resnets_have_the_cifar_stem_and_known_sizes():
    r18, r50 = models.cifar_resnet(18), models.cifar_resnet(50)
    assert models.count_params(r18) == 11_173_962 and models.count_params(r50) == 23_520_842
    for net in (r18, r50):
        assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
        assert isinstance(net.maxpool, torch.nn.Identity)
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stem_is_built_before_loading_so_loaded_stem_weights_survive():
    trained = models.cifar_resnet(18)
    with torch.no_grad():
        trained.conv1.weight.fill_(0.5)
    state = trained.state_dict()
    good = models.cifar_resnet(18)
    load_state_dict_strict(good, state)
    assert torch.equal(good.conv1.weight, state["conv1.weight"])
    # R2's order: load into the stock network, then replace the stem -> the stem is random again
    stock = torchvision.models.resnet18(weights=None, num_classes=10)
    with pytest.raises(CheckpointError, match=r"conv1.weight: checkpoint \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"):
        load_state_dict_strict(stock, state)


def test_multi_exit_shapes():
    m = models.MultiExitResNet18()
    logits, feats = m(torch.randn(2, 3, 32, 32))
    assert [tuple(p.shape) for p in logits] == [(2, 10)] * 4
    assert [tuple(h.shape) for h in feats] == [(2, 256, s, s) for s in (32, 16, 8, 4)]
    assert models.count_params(m) == 11_427_944


def _byot_by_hand(ps, hs, y, T, detach):
    t = ps[-1].detach() if detach else ps[-1]
    total = F.cross_entropy(ps[-1], y)
    for p, h in zip(ps[:-1], hs[:-1]):
        kl = F.kl_div(F.log_softmax(p / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
        target = F.interpolate(hs[-1].detach(), size=h.shape[-2:], mode="bilinear", align_corners=False)
        total = total + F.cross_entropy(p, y) + 0.7 * kl + 0.3 * ((h - target) ** 2).mean()
    return total


@pytest.mark.parametrize("detach", [False, True])
def test_byot_loss_matches_its_formula_and_detach_controls_the_teacher_gradient(detach):
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(4, 10, generator=g, requires_grad=True) for _ in range(4)]
    hs = [torch.randn(4, 8, s, s, generator=g, requires_grad=True) for s in (16, 8, 4, 2)]
    y = torch.tensor([0, 3, 5, 9])
    terms = losses.byot_terms(ps, hs, y, T=4.0, kd_weight=0.7, feature_weight=0.3, detach_teacher=detach)
    assert list(terms) == ["ce", "kd", "feature"]
    got = losses.total(terms)
    assert got.item() == pytest.approx(_byot_by_hand(ps, hs, y, 4.0, detach).item(), rel=1e-5)
    # each term on its own: the four exits' cross-entropy, the weighted KL and feature sums
    assert terms["ce"].item() == pytest.approx(sum(F.cross_entropy(p, y) for p in ps).item(), rel=1e-6)
    assert terms["feature"].item() == pytest.approx(0.3 * sum(
        ((h - F.interpolate(hs[-1], size=h.shape[-2:], mode="bilinear", align_corners=False)) ** 2).mean()
        for h in hs[:-1]).item(), rel=1e-6)
    got.backward()
    ce_only = torch.autograd.grad(F.cross_entropy(ps[-1], y), ps[-1])[0]
    if detach:
        assert torch.allclose(ps[-1].grad, ce_only, atol=1e-7)  # only its own CE reaches exit 4
    else:
        assert not torch.allclose(ps[-1].grad, ce_only, atol=1e-4)  # the KL terms pull it too
    assert hs[-1].grad is None or hs[-1].grad.abs().sum() == 0  # features always detached


def test_hooks_capture_named_layers_and_are_removed():
    net = models.cifar_resnet(18).eval()
    x = torch.randn(1, 3, 32, 32)
    with hooks.capture(net, ["layer2", "layer4.1"]) as feats:
        net(x)
        assert tuple(feats["layer2"].shape) == (1, 128, 16, 16)
        assert tuple(feats["layer4.1"].shape) == (1, 512, 4, 4)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(KeyError, match="no submodule 'layer9'"):
        with hooks.capture(net, ["layer9"]):
            pass
    with pytest.raises(RuntimeError):
        with hooks.capture(net, ["layer1"]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in net.modules())
