"""Random-sampling KD (first_lib.beyond.sampled) and stores of any rows (first_lib.beyond.stores):
the sampled target is an unbiased estimate of the teacher's distribution, its loss's gradient an
unbiased estimate of the full-vocabulary KL gradient, and the stores read back as written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from first_lib import knowledge as kn
from first_lib import losses
from first_lib.beyond import sampled, stores
from first_lib.errors import FirstError
from tests.test_knowledge import make_examples, tiny_qwen

P = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.04, 0.01], [0.05, 0.05, 0.1, 0.1, 0.3, 0.4]])


def _mean_target(n_draws: int, reps: int, proposal=None, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = P.repeat(reps, 1)
    q = None if proposal is None else proposal.repeat(reps, 1)
    ids, w = sampled.sparse_targets(probs, n_draws, gen, proposal=q)
    dense = sampled.dense_target(ids, w, P.shape[1])
    return dense.view(reps, *P.shape).mean(0)


@pytest.mark.parametrize("n_draws", [1, 3, 8])
def test_sampled_target_is_unbiased(n_draws):
    mean = _mean_target(n_draws, reps=40_000)
    # standard error of a share of draws <= 0.5 / sqrt(reps * N): 5 of them is a generous bound
    assert torch.allclose(mean, P, atol=5 * 0.5 / np.sqrt(40_000 * n_draws))


def test_sampled_target_with_another_proposal_is_unbiased():
    q = torch.softmax(torch.log(P) / 3.0, dim=-1)  # a flatter proposal: weights p/q differ from 1
    mean = _mean_target(4, reps=60_000, proposal=q, seed=1)
    assert torch.allclose(mean, P, atol=0.01)
    # a top-k target is biased: it never puts mass outside the k tokens
    assert P[0, 2:].sum() > 0.01


def test_sampled_target_shape_weights_and_padding():
    gen = torch.Generator().manual_seed(0)
    ids, w = sampled.sparse_targets(P, 5, gen)
    assert ids.shape == w.shape == (2, 5)
    assert torch.allclose(w.sum(-1), torch.ones(2))  # q = p: shares of the draws
    assert torch.all(w[:, :-1] >= w[:, 1:])  # sorted, padding (weight 0) last
    counts = (w * 5).round()
    assert torch.allclose(w * 5, counts, atol=1e-6)  # multiples of 1 / N
    nz = w > 0
    for row in range(2):  # the drawn tokens are distinct
        assert len(set(ids[row][nz[row]].tolist())) == int(nz[row].sum())
    assert torch.all(P.gather(1, ids)[nz] > 0)


def test_sampled_target_refuses_bad_input():
    with pytest.raises(FirstError, match="n_draws"):
        sampled.sparse_targets(P, 0)
    with pytest.raises(FirstError, match="positive wherever"):
        sampled.sparse_targets(P, 2, proposal=torch.tensor([[1.0, 0, 0, 0, 0, 0]] * 2))


def test_sampled_loss_gradient_is_unbiased_for_the_full_kl():
    torch.manual_seed(0)
    logits = torch.randn(2, P.shape[1])
    reps, n_draws = 20_000, 4
    gen = torch.Generator().manual_seed(2)
    ids, w = sampled.sparse_targets(P.repeat(reps, 1), n_draws, gen)
    z = logits.repeat(reps, 1).requires_grad_(True)
    sampled.sampled_kd_rows(z, ids, w).sum().backward()
    mean_grad = z.grad.view(reps, *P.shape).mean(0)
    full = logits.clone().requires_grad_(True)  # KL(p || softmax(z)) over the whole vocabulary
    (P * (P.log() - torch.log_softmax(full, -1))).sum().backward()
    assert torch.allclose(mean_grad, full.grad, atol=0.01)


def test_sampled_loss_is_the_full_topk_loss_up_to_a_constant():
    """Training with kd_normalize="full" on a sampled store minimises the RS-KD loss."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(3)
    ids, w = sampled.sparse_targets(P, 6, gen)
    za = torch.randn(2, 6, requires_grad=True)
    zb = za.detach().clone().requires_grad_(True)
    a = sampled.sampled_kd_rows(za, ids, w)
    b = losses.topk_kl_rows(zb, ids, w, normalize="full")
    entropy = -(w * torch.where(w > 0, w.log(), torch.zeros_like(w))).sum(-1)
    assert torch.allclose(a, b + entropy, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    assert torch.allclose(za.grad, zb.grad, atol=1e-6)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    model, examples = tiny_qwen(), make_examples(11)
    out = tmp_path_factory.mktemp("wide") / "k8"
    opts = {"batch_size": 4, "shard_size": 4, "autocast": False, "progress": False}
    kn.extract_topk(model, examples, out, k=8, **opts)
    return model, examples, out, opts


def test_truncated_store_equals_an_extraction_at_k(wide, tmp_path):
    model, examples, src, opts = wide
    cut = stores.truncate_store(src, tmp_path / "cut3", 3, examples)
    direct = kn.extract_topk(model, examples, tmp_path / "k3", k=3, **opts)
    a, b = kn.TopKStore(cut), kn.TopKStore(direct)
    a.validate()
    a.check_alignment(examples)
    assert a.k == 3 and len(a) == len(b)
    for i in range(len(a)):
        assert np.array_equal(a.example(i)[0], b.example(i)[0])
        assert np.array_equal(a.example(i)[1], b.example(i)[1])
    assert stores.payload_bytes(cut) == stores.payload_bytes(direct)
    with pytest.raises(FirstError, match="truncate"):
        stores.truncate_store(src, tmp_path / "bad", 9, examples)


def test_sampled_store_from_a_teacher(wide, tmp_path):
    model, examples, src, _ = wide
    got = sampled.sample_teacher(model, examples, draws=[3, 8], seed=0, batch_size=4)
    again = sampled.sample_teacher(model, examples, draws=[3, 8], seed=0, batch_size=4)
    for n in (3, 8):
        path = stores.write_store(
            tmp_path / f"s{n}", examples, lambda i, n=n: got[n][i], n, 300, "tiny"
        )
        store = kn.TopKStore(path)
        store.validate()
        store.check_alignment(examples)
        for i in range(len(store)):
            ids, w = store.example(i)
            assert np.array_equal(ids, got[n][i][0]) and np.array_equal(ids, again[n][i][0])
            assert np.allclose(w.sum(-1), 1.0, atol=2e-3)
        # same width, same bytes a position as a top-k store of k = N
        assert stores.payload_bytes(path) == stores.payload_bytes(
            stores.truncate_store(src, tmp_path / f"t{n}", n, examples)
        )
