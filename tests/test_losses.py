"""Every loss against its formula on fixed tensors."""
import math

import pytest
import torch
import torch.nn.functional as F

from kdutils import losses

S = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
T_LOGITS = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 0.5]])
Y = torch.tensor([0, 2])


def _manual_kl(s, t, T):
    total = 0.0
    for i in range(len(s)):
        p = [math.exp(v / T) for v in t[i].tolist()]
        q = [math.exp(v / T) for v in s[i].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(s)


def _manual_ce(s, y):
    total = 0.0
    for i in range(len(s)):
        z = s[i].tolist()
        total += -(z[y[i]] - math.log(sum(math.exp(v) for v in z)))
    return total / len(s)


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_kd_loss_matches_formula(T, alpha):
    expected = alpha * _manual_kl(S, T_LOGITS, T) * T**2 + (1 - alpha) * _manual_ce(S, Y)
    got = losses.kd_loss(S, T_LOGITS, Y, T=T, alpha=alpha).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_kd_loss_pinned_value():
    # Precomputed once by hand (T=2, alpha=0.5) and pinned: a silent change to the loss fails here.
    assert losses.kd_loss(S, T_LOGITS, Y, T=2.0, alpha=0.5).item() == pytest.approx(
        0.5 * _manual_kl(S, T_LOGITS, 2.0) * 4 + 0.5 * _manual_ce(S, Y), rel=1e-6)
    assert _manual_kl(S, T_LOGITS, 2.0) == pytest.approx(0.065340, abs=1e-6)


def test_kl_zero_for_identical_logits_and_positive_otherwise():
    assert losses.soft_target_loss(T_LOGITS, T_LOGITS, 4.0).item() == pytest.approx(0, abs=1e-7)
    # invariant to a constant shift of the logits
    assert losses.soft_target_loss(T_LOGITS + 3.0, T_LOGITS, 4.0).item() == pytest.approx(0, abs=1e-6)
    assert losses.soft_target_loss(S, T_LOGITS, 4.0).item() > 1e-3


def test_soft_cross_entropy_differs_from_kl_by_teacher_entropy_and_has_same_gradient():
    T = 5.0
    s1 = S.clone().requires_grad_(True)
    s2 = S.clone().requires_grad_(True)
    kl = losses.soft_target_loss(s1, T_LOGITS, T)
    ce = losses.soft_cross_entropy(s2, T_LOGITS, T)
    p = F.softmax(T_LOGITS / T, dim=1)
    entropy = -(p * p.log()).sum(1).mean() * T**2
    assert (ce - kl).item() == pytest.approx(entropy.item(), rel=1e-5)
    kl.backward()
    ce.backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_kd_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="T must be > 0"):
        losses.kd_loss(S, T_LOGITS, Y, T=0.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        losses.kd_loss(S, T_LOGITS, Y, T=2.0, alpha=1.5)


def test_cosine_loss_matches_torch_cosine_embedding_loss():
    torch.manual_seed(0)
    hs, ht = torch.randn(4, 16, 8, 8), torch.randn(4, 1024)
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    ref = torch.nn.CosineEmbeddingLoss()(hs.flatten(1), ht, torch.ones(4))
    got = losses.cosine_loss(logits, hs, ht, y, hidden_weight=0.3, ce_weight=0.7)
    assert got.item() == pytest.approx(0.3 * ref.item() + 0.7 * F.cross_entropy(logits, y).item(), rel=1e-5)
    same = losses.cosine_loss(logits, ht.view(4, 16, 8, 8), ht, y, hidden_weight=1.0, ce_weight=0.0)
    assert same.item() == pytest.approx(0.0, abs=1e-5)


def test_cosine_loss_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="hidden shapes differ"):
        losses.cosine_loss(torch.zeros(2, 10), torch.zeros(2, 1024), torch.zeros(2, 2048), torch.zeros(2).long())


def test_pool_to_dim_averages_neighbouring_pairs():
    h = torch.arange(8.0).view(1, 2, 2, 2)
    assert losses.pool_to_dim(h, 4).tolist() == [[0.5, 2.5, 4.5, 6.5]]
    with pytest.raises(ValueError, match="not a multiple"):
        losses.pool_to_dim(h, 3)


def test_hint_loss_matches_formula():
    torch.manual_seed(1)
    r, t = torch.randn(3, 32, 8, 8), torch.randn(3, 32, 8, 8)
    logits, y = torch.randn(3, 10), torch.tensor([0, 5, 9])
    expected = 0.7 * ((r - t) ** 2).mean() + 0.3 * F.cross_entropy(logits, y)
    assert losses.hint_loss(logits, r, t, y).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        losses.hint_loss(logits, r[:, :16], t, y)
