"""Top-k KL (eq. 5) and masked CE: against a direct float64 computation, and as properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from first_lib.errors import FirstError
from first_lib.losses import ce_rows, masked_ce, topk_kl, topk_kl_rows

torch.set_num_threads(2)

B, T, V, K = 3, 7, 50, 5


def make_batch(seed: int, zero_probs: bool = True, dtype=torch.float32):
    """Random student logits and a teacher top-k (ids distinct per position, probs < 1 in sum)."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 3).to(dtype)
    teacher = torch.softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3, -1)
    probs, ids = teacher.topk(K, dim=-1)
    perm = torch.rand(B, T, K, generator=g).argsort(-1)  # not in rank order: order must not matter
    probs, ids = probs.gather(-1, perm), ids.gather(-1, perm)
    if zero_probs:
        probs[0, 0, 1] = 0.0
        probs[1, 2, :2] = 0.0
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, 0] = mask[1, 2] = True
    return logits, ids, probs.float(), mask


def reference(logits, ids, probs, mask, normalize, reduction):
    """Direct float64 computation, position by position: an independent reference on purpose
    (no code shared with `first_lib.losses`), to cross-check `topk_kl`."""
    total, count = 0.0, 0
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            lp = torch.log_softmax(logits[b, t].double(), -1)  # full vocabulary
            q = lp[ids[b, t]].exp().numpy()
            p = probs[b, t].double().numpy()
            if normalize == "renorm":
                p, q = p / p.sum(), q / q.sum()
            elif normalize == "tail":
                p = np.append(p, max(0.0, 1 - p.sum()))
                q = np.append(q, 1 - q.sum())
            total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)
            count += 1
    return total / (count if reduction == "mean" else B)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("normalize", ["renorm", "tail", "full"])
@pytest.mark.parametrize("reduction", ["mean", "sum_per_batch"])
def test_topk_kl_equals_float64_reference(seed, normalize, reduction):
    logits, ids, probs, mask = make_batch(seed)
    got = topk_kl(logits, ids, probs, mask, normalize=normalize, reduction=reduction)
    assert got.dtype == torch.float32 and got.dim() == 0
    want = reference(logits, ids, probs, mask, normalize, reduction)
    assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_topk_kl_bf16_logits_are_computed_in_float32():
    logits, ids, probs, mask = make_batch(0, dtype=torch.bfloat16)
    got = topk_kl(logits, ids, probs, mask, normalize="tail")
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(
        reference(logits, ids, probs, mask, "tail", "mean"), rel=1e-5
    )


@pytest.mark.parametrize("normalize", ["renorm", "tail", "full"])
def test_kl_is_zero_for_identical_distributions(normalize):
    logits, ids, _, mask = make_batch(1)
    student = torch.softmax(logits.double(), -1).gather(-1, ids)  # the student's own top-k probs
    loss = topk_kl(logits, ids, student.float(), mask, normalize=normalize)
    assert abs(float(loss)) < 1e-5


@pytest.mark.parametrize("seed", range(20))
def test_kl_never_negative_under_renorm_and_tail(seed):
    logits, ids, probs, mask = make_batch(seed, zero_probs=seed % 2 == 0)
    rows_renorm = topk_kl_rows(logits[mask], ids[mask], probs[mask], "renorm")
    rows_tail = topk_kl_rows(logits[mask], ids[mask], probs[mask], "tail")
    assert (rows_renorm >= -1e-6).all() and (rows_tail >= -1e-6).all()
    assert rows_renorm.shape == (int(mask.sum()),)


def test_full_normalisation_is_not_a_proper_kl():
    logits, ids, _, mask = make_batch(2)
    student = torch.softmax(logits.double(), -1).gather(-1, ids).float()
    # the teacher puts half the student's mass on each token: sum p log(p/q) = log(1/2) * sum p < 0
    loss = topk_kl(logits, ids, student / 2, mask, normalize="full")
    assert float(loss) < 0
    assert float(topk_kl(logits, ids, student / 2, mask, normalize="renorm")) == pytest.approx(
        0.0, abs=1e-5
    )


def test_gradient_is_zero_outside_the_teacher_topk_under_renorm():
    logits, ids, probs, mask = make_batch(3)
    logits.requires_grad_(True)
    topk_kl(logits, ids, probs, mask, normalize="renorm").backward()
    grad = logits.grad
    in_topk = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, ids, True)
    assert torch.count_nonzero(grad[~in_topk]) == 0  # exactly zero, not merely small
    assert torch.count_nonzero(grad[~mask]) == 0  # masked positions get no gradient
    assert torch.count_nonzero(grad[mask][in_topk[mask]]) > 0
    # under "tail" and "full" the whole vocabulary gets gradient (through the normaliser)
    logits.grad = None
    topk_kl(logits, ids, probs, mask, normalize="tail").backward()
    assert torch.count_nonzero(logits.grad[mask][~in_topk[mask]]) > 0


@pytest.mark.parametrize("normalize", ["renorm", "tail", "full"])
def test_zero_teacher_probs_give_no_nan(normalize):
    logits, ids, probs, mask = make_batch(4)
    probs[mask] = 0.0  # a teacher with every kept probability 0 (0 * log 0 = 0)
    probs[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    logits = logits.clone().requires_grad_(True)
    with torch.no_grad():
        logits[1, 2, ids[1, 2, 0]] = -float("inf")  # a student token with probability 0
    loss = topk_kl(logits, ids, probs, mask, normalize=normalize)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad[mask]).all()


@pytest.mark.parametrize("normalize", ["renorm", "tail", "full"])
@pytest.mark.parametrize("reduction", ["mean", "sum_per_batch"])
def test_all_masked_batch_gives_zero_with_grad(normalize, reduction):
    logits, ids, probs, _ = make_batch(5)
    logits.requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss = topk_kl(logits, ids, probs, mask, normalize=normalize, reduction=reduction)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0
    ce = masked_ce(logits, ids[..., 0], mask, reduction=reduction)
    assert float(ce.detach()) == 0.0 and ce.requires_grad


def test_student_mass_near_one_stays_finite_in_tail():
    logits = torch.full((1, 1, V), -1e4)
    logits[0, 0, :K] = 10.0  # the student's top-k hold all the mass: rest = 0
    ids = torch.arange(K).reshape(1, 1, K)
    probs = torch.full((1, 1, K), 0.18)  # the teacher leaves 0.1 for the rest
    loss = topk_kl(logits, ids, probs, normalize="tail")
    assert torch.isfinite(loss) and float(loss) > 0.5  # large but finite (rest clamped ~1e-6)


def test_mask_none_and_reductions_relate():
    logits, ids, probs, _ = make_batch(6)
    full = torch.ones(B, T, dtype=torch.bool)
    mean = topk_kl(logits, ids, probs)
    assert float(mean) == pytest.approx(float(topk_kl(logits, ids, probs, full)))
    per_batch = topk_kl(logits, ids, probs, reduction="sum_per_batch")
    assert float(per_batch) == pytest.approx(float(mean) * T, rel=1e-6)


def test_input_errors():
    logits, ids, probs, mask = make_batch(7)
    with pytest.raises(FirstError, match="normalize"):
        topk_kl(logits, ids, probs, mask, normalize="softmax")
    with pytest.raises(FirstError, match="reduction"):
        topk_kl(logits, ids, probs, mask, reduction="sum")
    with pytest.raises(FirstError, match="long"):
        topk_kl(logits, ids.int(), probs, mask)
    with pytest.raises(FirstError, match="mask"):
        topk_kl(logits, ids, probs, mask[:, :-1])
    with pytest.raises(FirstError):
        topk_kl(logits, ids[..., :3], probs, mask)
    with pytest.raises(FirstError):
        topk_kl(logits[0], ids[0], probs[0], mask[0])


# --------------------------------------------------------------------------- CE


@pytest.mark.parametrize("reduction", ["mean", "sum_per_batch"])
def test_masked_ce_equals_float64_cross_entropy(reduction):
    logits, ids, _, mask = make_batch(8, dtype=torch.bfloat16)
    labels = ids[..., 0]
    got = masked_ce(logits, labels, mask, reduction=reduction)
    rows = F.cross_entropy(logits[mask].double(), labels[mask], reduction="none")
    want = rows.sum() / (mask.sum() if reduction == "mean" else B)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    np.testing.assert_allclose(ce_rows(logits[mask], labels[mask]).numpy(), rows.numpy(), rtol=1e-5)


def test_ce_and_kd_agree_on_a_one_hot_teacher():
    # With a one-hot teacher, the "full" KL is the cross-entropy of the top-1 label.
    logits, ids, _, mask = make_batch(9)
    onehot = torch.zeros(B, T, K)
    onehot[..., 0] = 1.0
    kd = topk_kl(logits, ids, onehot, mask, normalize="full")
    assert float(kd) == pytest.approx(float(masked_ce(logits, ids[..., 0], mask)), rel=1e-6)
