"""Distillation losses as pure functions of tensors (chapters 2 to 5).

Notation, as in the chapters: ``s`` student logits, ``t`` teacher logits, ``y`` labels,
``T`` temperature, ``p^T = softmax(t / T)``, ``q^T = softmax(s / T)``. All losses are
means over the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def ce_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the hard labels: ``CE(s, y) = -mean_i log softmax(s_i)[y_i]``."""
    return F.cross_entropy(student_logits, labels)


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     T: float) -> torch.Tensor:
    """``T^2 * KL(p^T || q^T)``, summed over classes, mean over the batch.

    Zero when student and teacher logits are equal (up to a constant per row), positive
    otherwise. The ``T^2`` keeps its gradient on the scale of the hard-label loss.
    """
    log_q = F.log_softmax(student_logits / T, dim=-1)
    log_p = F.log_softmax(teacher_logits / T, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * T**2


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       T: float) -> torch.Tensor:
    """R5's soft loss: ``T^2 * mean_i -sum_c p^T_ic log q^T_ic`` (cross-entropy to soft targets).

    Equals :func:`soft_target_loss` plus ``T^2 * H(p^T)``, the teacher's entropy, which does
    not depend on the student: same gradients, different value (chapter 3 shows it).
    """
    p = F.softmax(teacher_logits / T, dim=-1)
    log_q = F.log_softmax(student_logits / T, dim=-1)
    return -(p * log_q).sum(dim=-1).mean() * T**2


def kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             T: float, alpha: float) -> dict[str, torch.Tensor]:
    """The two terms of Hinton et al. (2015), weighted: ``{"kd": alpha * T^2 * KL(p^T || q^T),
    "ce": (1 - alpha) * CE(s, y)}``; their sum is :func:`kd_loss`."""
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return {"kd": alpha * soft_target_loss(student_logits, teacher_logits, T),
            "ce": (1 - alpha) * ce_loss(student_logits, labels)}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            T: float, alpha: float) -> torch.Tensor:
    """Hinton et al. (2015): ``alpha * T^2 * KL(p^T || q^T) + (1 - alpha) * CE(s, y)``."""
    return total(kd_terms(student_logits, teacher_logits, labels, T, alpha))


def total(out: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss a step returned: the tensor itself, or its named terms added up in order."""
    if not isinstance(out, dict):
        return out
    values = iter(out.values())
    loss = next(values)
    for v in values:
        loss = loss + v
    return loss


def pool_to_dim(h: torch.Tensor, dim: int) -> torch.Tensor:
    """Flatten ``h`` to ``(N, D)`` and average neighbouring values down to ``(N, dim)``.

    ``D`` must be a multiple of ``dim``. R5 maps the teacher's 2048 values to the
    student's 1024 this way (``avg_pool1d`` with kernel 2).
    """
    flat = torch.flatten(h, 1)
    if flat.shape[1] % dim:
        raise ValueError(f"cannot pool {flat.shape[1]} values to {dim}: not a multiple")
    k = flat.shape[1] // dim
    return F.avg_pool1d(flat.unsqueeze(1), kernel_size=k).squeeze(1)


def cosine_terms(student_logits: torch.Tensor, student_hidden: torch.Tensor,
                 teacher_hidden: torch.Tensor, labels: torch.Tensor,
                 hidden_weight: float, ce_weight: float) -> dict[str, torch.Tensor]:
    """``{"cosine": hidden_weight * mean_i (1 - cos(h^s_i, h^t_i)), "ce": ce_weight * CE(s, y)}``.

    ``h^s`` and ``h^t`` are flattened to vectors of the same length (pool the larger one
    first, :func:`pool_to_dim`). ``1 - cos`` is ``CosineEmbeddingLoss`` with target +1.
    """
    hs, ht = torch.flatten(student_hidden, 1), torch.flatten(teacher_hidden, 1)
    if hs.shape != ht.shape:
        raise ValueError(f"hidden shapes differ: student {tuple(hs.shape)}, teacher {tuple(ht.shape)}")
    cos = F.cosine_similarity(hs, ht, dim=1)
    return {"cosine": hidden_weight * (1 - cos).mean(), "ce": ce_weight * ce_loss(student_logits, labels)}


def cosine_loss(student_logits: torch.Tensor, student_hidden: torch.Tensor,
                teacher_hidden: torch.Tensor, labels: torch.Tensor,
                hidden_weight: float = 0.3, ce_weight: float = 0.7) -> torch.Tensor:
    """The sum of :func:`cosine_terms`: cosine distance of hidden states plus cross-entropy."""
    return total(cosine_terms(student_logits, student_hidden, teacher_hidden, labels,
                              hidden_weight, ce_weight))


def hint_terms(student_logits: torch.Tensor, student_regressed: torch.Tensor,
               teacher_map: torch.Tensor, labels: torch.Tensor,
               hint_weight: float, ce_weight: float) -> dict[str, torch.Tensor]:
    """FitNets hint: ``{"hint": hint_weight * MSE(r(f^s), f^t), "ce": ce_weight * CE(s, y)}``.

    ``r(f^s)`` is the student's feature map after the trainable regressor and must have
    the shape of the teacher's map ``f^t``; MSE is the mean over all elements.
    """
    if student_regressed.shape != teacher_map.shape:
        raise ValueError(f"regressed student map {tuple(student_regressed.shape)} does not match "
                         f"the teacher's {tuple(teacher_map.shape)}")
    return {"hint": hint_weight * F.mse_loss(student_regressed, teacher_map),
            "ce": ce_weight * ce_loss(student_logits, labels)}


def hint_loss(student_logits: torch.Tensor, student_regressed: torch.Tensor,
              teacher_map: torch.Tensor, labels: torch.Tensor,
              hint_weight: float = 0.7, ce_weight: float = 0.3) -> torch.Tensor:
    """The sum of :func:`hint_terms`."""
    return total(hint_terms(student_logits, student_regressed, teacher_map, labels,
                            hint_weight, ce_weight))


def byot_terms(exit_logits: list[torch.Tensor], exit_features: list[torch.Tensor],
               labels: torch.Tensor, *, T: float, kd_weight: float, feature_weight: float,
               detach_teacher: bool) -> dict[str, torch.Tensor]:
    """Self-distillation across exits ("Be Your Own Teacher"), as in R1, as named terms.

    With the deepest exit ``K`` as teacher (logits ``p_K``, features ``h_K``)::

        ce      = CE(p_K, y) + sum_{i<K} CE(p_i, y)
        kd      = kd_weight * sum_{i<K} T^2 * KL(softmax(p_K/T) || softmax(p_i/T))
        feature = feature_weight * sum_{i<K} MSE(h_i, resize(h_K.detach(), h_i))

    ``resize`` is bilinear interpolation to the spatial size of ``h_i``. The teacher's
    features are always detached; its logits only with ``detach_teacher=True`` (R1 does not
    detach them, so the KL terms also train the deepest exit towards the shallow ones).
    """
    teacher_logits = exit_logits[-1].detach() if detach_teacher else exit_logits[-1]
    teacher_feat = exit_features[-1].detach()
    ce, kd, feature = ce_loss(exit_logits[-1], labels), 0.0, 0.0
    for p, h in zip(exit_logits[:-1], exit_features[:-1]):
        target = F.interpolate(teacher_feat, size=h.shape[-2:], mode="bilinear", align_corners=False)
        ce = ce + ce_loss(p, labels)
        kd = kd + soft_target_loss(p, teacher_logits, T)
        feature = feature + F.mse_loss(h, target)
    return {"ce": ce, "kd": kd_weight * kd, "feature": feature_weight * feature}


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              *, alpha: float, beta: float, T: float) -> dict[str, torch.Tensor]:
    """Decoupled KD (Zhao et al. 2022): KD's KL split into what it says about the target class
    and about the other classes, weighted apart.

    With ``b = (p_y, 1 - p_y)`` the binary target/non-target probabilities and ``p̂`` the
    distribution over the non-target classes alone (both at temperature ``T``)::

        tckd = alpha * T^2 * KL(b^t || b^s)
        nckd = beta  * T^2 * KL(p̂^t || p̂^s)

    Hinton's ``T^2 * KL(p^T || q^T)`` equals ``T^2 * KL(b^t || b^s) + (1 - p^t_y) T^2 KL(p̂^t || p̂^s)``:
    DKD drops the factor ``1 - p^t_y``, which silences the non-target term exactly when the
    teacher is confident.
    """
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    p_s, p_t = F.softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1)
    b_s = torch.stack([p_s[target], 1 - p_s[target]], dim=1).clamp_min(1e-12)
    b_t = torch.stack([p_t[target], 1 - p_t[target]], dim=1).clamp_min(1e-12)
    tckd = F.kl_div(b_s.log(), b_t, reduction="batchmean")
    # the non-target distributions: softmax with the target class masked out
    masked = lambda z: (z / T).masked_fill(target, float("-inf"))  # noqa: E731
    log_q_hat = F.log_softmax(masked(student_logits), dim=-1).masked_fill(target, 0.0)
    p_hat = F.softmax(masked(teacher_logits), dim=-1)
    nckd = (p_hat * (p_hat.clamp_min(1e-12).log() - log_q_hat)).sum(-1).mean()
    return {"tckd": alpha * T**2 * tckd, "nckd": beta * T**2 * nckd}
