"""Top-k store: packing, fidelity to the teacher, resumption, sharding, and the error paths."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from first_lib import knowledge as kn
from first_lib.errors import FirstError
from first_lib.knowledge import (
    TopKStore,
    collate,
    coverage,
    disk,
    extract_topk,
    finalize_store,
    topk,
)

torch.set_num_threads(2)


def tiny_qwen(vocab: int = 300, hidden: int = 64, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper than the default init, so top-k mass is not uniform
        model.lm_head.weight.mul_(20.0)
    return model


def make_examples(n: int = 23, vocab: int = 300, seed: int = 0) -> list[dict]:
    """Varied lengths (so sorting by length reorders batches); targets on the second half."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 40))
        mask = [length // 2 <= t < length - 1 for t in range(length)]
        ids = rng.integers(0, vocab, length)
        ids[0], ids[-1] = 0, vocab - 1
        out.append({"id": f"q{i:03d}", "input_ids": ids.tolist(), "target_mask": mask})
    return out


@pytest.fixture(scope="module")
def model() -> transformers.Qwen2ForCausalLM:
    return tiny_qwen()


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return make_examples()


OPTS = {"k": 5, "batch_size": 4, "shard_size": 5, "autocast": False, "progress": False}


@pytest.fixture(scope="module")
def built(model, examples, tmp_path_factory) -> Path:
    """One finished store (5 shards) shared by the tests that only read it."""
    return extract_topk(model, examples, tmp_path_factory.mktemp("built") / "s", **OPTS)


def copy_of(store: Path, tmp_path: Path) -> Path:
    """A private copy of a store, for tests that damage it."""
    return Path(shutil.copytree(store, tmp_path / "copy", ignore=shutil.ignore_patterns(".locks")))


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file of a store (the per-process lock files aside), by relative path."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def full_softmax(model, ex: dict) -> torch.Tensor:
    """Reference: fp32 probabilities [T, V] from the plain forward pass. An independent
    reference on purpose (no extraction code): the stored top-k is checked against it."""
    with torch.inference_mode():
        logits = model(torch.tensor([ex["input_ids"]])).logits[0]
    return logits.double().softmax(-1).float()


# ---------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("vocab", [300, 65_536, 151_936, 262_144, 2**32])
@pytest.mark.parametrize("k", [1, 5, 7])
def test_pack_round_trip(vocab: int, k: int) -> None:
    rng = np.random.default_rng(vocab + k)
    ids = rng.integers(0, vocab, size=(50, k), dtype=np.int64)
    ids[0, :] = 0
    ids[1, :] = vocab - 1
    ids[2, 0], ids[2, -1] = vocab - 1, 0
    lo, hi = kn.pack_ids(ids, vocab)
    lay = kn.IdLayout(k, vocab)
    assert lo.dtype == lay.lo_dtype and hi.shape == (50, lay.hi_bytes)
    assert lo.itemsize * k + hi.shape[1] == lay.id_bytes
    np.testing.assert_array_equal(kn.unpack_ids(lo, hi, vocab), ids)


def test_narrow_widths() -> None:
    assert kn.id_bits(151_936) == 18 and kn.id_bits(65_536) == 16 and kn.id_bits(65_537) == 17
    assert kn.id_bits(256) == 8 and kn.id_bits(300) == 9 and kn.id_bits(2) == 1
    assert kn.bytes_per_position(5, 151_936) == 22  # 10 + ceil(5 * 2 / 8) + 10
    assert kn.bytes_per_position(5, 65_536) == 20  # no high part
    assert kn.bytes_per_position(5, 256) == 15  # uint8 ids
    assert kn.bytes_per_position(5, 2**32) == 30  # 10 + 10 (5 x 16 high bits) + 10
    with pytest.raises(FirstError):
        kn.id_bits(2**32 + 1)


def test_real_vocab_store_is_22_bytes(tmp_path: Path) -> None:
    """A store over Qwen's 151,936-token vocabulary: ids above 65,535 survive, 22 bytes/pos."""
    vocab = 151_936
    model = tiny_qwen(vocab=vocab, hidden=16)
    exs = make_examples(6, vocab=vocab, seed=1)
    path = extract_topk(model, exs, tmp_path / "s", positions="all", **OPTS)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["bytes_per_position"] == 22
    assert meta["payload_bytes"] == 22 * meta["n_positions"]
    store = TopKStore(path)
    store.validate(check_hashes=True)
    ids = np.concatenate([store.example(i)[0] for i in range(len(store))])
    assert ids.max() >= 65_536  # the high bits are exercised
    ex = exs[2]
    ref = full_softmax(model, ex)[:-1].topk(5)
    got_ids, got_p = store.get(ex["id"])
    np.testing.assert_allclose(got_p, ref.values.numpy(), rtol=2e-3, atol=1e-6)
    same = got_ids == ref.indices.numpy()
    assert same.mean() > 0.95  # ties aside, the same tokens


# ----------------------------------------------------------------------- fidelity and order


@pytest.mark.parametrize("positions", ["targets", "all"])
@pytest.mark.parametrize("dtype", ["prob-fp16", "logprob-fp16"])
def test_stored_topk_matches_full_softmax(model, examples, tmp_path, positions, dtype) -> None:
    path = extract_topk(model, examples, tmp_path / "s", positions=positions, dtype=dtype, **OPTS)
    store = TopKStore(path)
    store.validate()
    for ex in examples[:8]:
        probs = full_softmax(model, ex)
        rows = np.flatnonzero(ex["target_mask"]) if positions == "targets" else None
        ref_p = probs[rows] if rows is not None else probs[:-1]
        top = ref_p.topk(5)
        ids, p = store.get(ex["id"])
        assert ids.dtype == np.int64 and p.dtype == np.float32 and ids.shape == p.shape
        np.testing.assert_allclose(p, top.values.numpy(), rtol=2e-3, atol=1e-6)
        # the stored ids carry the stored probabilities (robust to ties in the ranking)
        np.testing.assert_allclose(
            torch.gather(ref_p, 1, torch.from_numpy(ids)).numpy(), p, rtol=2e-3, atol=1e-6
        )
        assert np.all(np.diff(p, axis=1) <= 0)  # sorted by rank


def test_bf16_autocast_close_to_fp32(model, examples, tmp_path) -> None:
    opts = {**OPTS, "autocast": True}
    store = TopKStore(extract_topk(model, examples, tmp_path / "s", **opts))
    for ex in examples[:5]:
        ref = full_softmax(model, ex)[np.flatnonzero(ex["target_mask"])].topk(5).values
        _, p = store.get(ex["id"])
        np.testing.assert_allclose(p, ref.numpy(), atol=0.05)


def test_order_preserved_and_index(model, examples, built) -> None:
    store = TopKStore(built)
    assert len(store) == len(examples)
    assert store.ids == [ex["id"] for ex in examples]
    for i, ex in enumerate(examples):
        assert store.index_of(ex["id"]) == i
        assert store.digest(i) == kn.example_digest(ex)
        ids, probs = store.example(i)
        assert ids.shape == (sum(ex["target_mask"]), 5)
        ref = full_softmax(model, ex)[np.flatnonzero(ex["target_mask"])]
        np.testing.assert_allclose(probs[:, 0], ref.max(-1).values.numpy(), rtol=2e-3)
    with pytest.raises(FirstError):
        store.get("nope")


def test_fallback_full_logits_path_equals_hidden_path(model, examples, tmp_path) -> None:
    class Wrapped(torch.nn.Module):  # no .model / .lm_head: the full-logits path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = inner.config

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            return self.inner(**kw)

    assert topk._model_parts(Wrapped(model)) is None
    a = TopKStore(extract_topk(model, examples, tmp_path / "a", **OPTS))
    b = TopKStore(extract_topk(Wrapped(model), examples, tmp_path / "b", **OPTS))
    for i in range(len(examples)):
        np.testing.assert_array_equal(a.example(i)[0], b.example(i)[0])
        np.testing.assert_allclose(a.example(i)[1], b.example(i)[1], rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------------------- coverage


def test_coverage_statistics(built) -> None:
    store = TopKStore(built)
    cov = store.meta["coverage"]
    mean = np.array(cov["mean"])
    assert cov["k"] == list(range(1, 101)) and cov["n_positions"] == store.meta["n_positions"]
    assert np.all(np.diff(mean) >= 0) and mean[-1] <= 1.0 + 1e-6 and mean[0] > 0
    lo, hi = np.array(cov["min"]), np.array(cov["max"])
    p05, p50, p95 = (np.array(cov[q]) for q in ("p05", "p50", "p95"))
    assert np.all(lo <= p05 + 1e-6) and np.all(p05 <= p50 + 1e-6) and np.all(p50 <= p95 + 1e-6)
    assert np.all(p95 <= hi + 1e-6) and np.all(lo <= mean) and np.all(mean <= hi)
    assert np.all(np.diff(p50) >= -1e-3)  # a quantile of non-decreasing rows is non-decreasing
    stored = np.concatenate([store.example(i)[1] for i in range(len(store))]).sum(-1)
    assert store.meta["mean_topk_mass"] == pytest.approx(stored.mean(), abs=2e-3)
    assert mean[4] == pytest.approx(store.meta["mean_topk_mass"])
    assert stored.min() == pytest.approx(lo[4], abs=2e-3)


def test_coverage_quantiles_sample_rows() -> None:
    """The reservoir keeps a uniform sample: quantiles of 10^4 known rows come out right."""
    cov = coverage._Coverage(width=3, seed=0, reservoir=2000)
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(10_000, 1)).astype(np.float32)
    rows = np.concatenate([x, x, x], axis=1)
    for s in range(0, 10_000, 700):
        cov.update(rows[s : s + 700])
    merged = coverage._merge_coverage([cov.state()], [cov.sample()])
    assert merged["p05"][0] == pytest.approx(0.05, abs=0.02)
    assert merged["p95"][0] == pytest.approx(0.95, abs=0.02)
    assert merged["mean"][0] == pytest.approx(float(x.mean()), abs=1e-6)


# ----------------------------------------------------- resumption, processes, unfinished


def test_resume_after_interruption_is_byte_identical(model, examples, built, tmp_path) -> None:

    def crash(index: int) -> None:
        if index == 1:
            raise KeyboardInterrupt("simulated kill after shard 1")

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        extract_topk(model, examples, out, on_shard_written=crash, **OPTS)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000", "shard-00001"]
    with pytest.raises(FirstError, match="not a finished top-k store"):
        TopKStore(out)
    with pytest.raises(FirstError, match="missing or incomplete"):
        finalize_store(out)
    # a half-written shard left by a killed process is removed and redone
    junk = out / "shard-00002.tmp-99999"
    junk.mkdir()
    (junk / "values.bin").write_bytes(b"\x00" * 7)
    done = []
    extract_topk(model, examples, out, on_shard_written=done.append, **OPTS)
    assert done == [2, 3, 4]  # shards 0 and 1 were not recomputed
    assert not junk.exists()
    assert tree_bytes(out) == tree_bytes(built)


def test_truncated_finished_shard_is_redone(model, examples, tmp_path) -> None:
    out = extract_topk(model, examples[:10], tmp_path / "s", **OPTS)
    ref = tree_bytes(out)
    (out / "MANIFEST.json").unlink()
    values = out / "shard-00001" / "values.bin"
    values.write_bytes(values.read_bytes()[:-4])
    done = []
    extract_topk(model, examples[:10], out, on_shard_written=done.append, **OPTS)
    assert done == [1] and tree_bytes(out) == ref


def test_two_processes_round_robin_equal_one(model, examples, built, tmp_path) -> None:
    two = tmp_path / "two"
    seen: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        extract_topk(
            model,
            examples,
            two,
            process_index=rank,
            num_processes=2,
            on_shard_written=seen[rank].append,
            **OPTS,
        )
        if rank == 0:
            assert not (two / "MANIFEST.json").exists()
            with pytest.raises(FirstError, match="not every process"):
                finalize_store(two)
    assert seen == {0: [0, 2, 4], 1: [1, 3]}
    finalize_store(two)
    assert tree_bytes(two) == tree_bytes(built)


def test_finished_store_is_reused_and_settings_checked(model, examples, built, tmp_path) -> None:
    out = copy_of(built, tmp_path)
    before = tree_bytes(out)
    done = []
    extract_topk(model, examples, out, on_shard_written=done.append, **OPTS)
    assert done == [] and tree_bytes(out) == before
    with pytest.raises(FirstError, match="different settings"):
        extract_topk(model, examples, out, **{**OPTS, "k": 3})
    with pytest.raises(FirstError, match="different settings"):
        extract_topk(model, examples[:-1], out, **OPTS)


def test_second_writer_is_refused(model, examples, tmp_path) -> None:
    out = tmp_path / "s"
    with disk._lock(out, 0), pytest.raises(FirstError, match="already writing"):
        extract_topk(model, examples, out, **OPTS)


# ---------------------------------------------------------------------- alignment, collate


def test_alignment_mismatch_detected(examples, built) -> None:
    store = TopKStore(built)
    store.check_alignment(examples)
    other = [dict(ex) for ex in examples]
    other[3] = {**other[3], "input_ids": [1] + other[3]["input_ids"][1:]}
    with pytest.raises(FirstError, match="store made from other data"):
        store.check_alignment(other)
    with pytest.raises(FirstError, match="store made from other data"):
        store.check_alignment(examples[::-1])
    with pytest.raises(FirstError, match="store made from other data"):
        collate([other[3]], store)


def test_collate_batch(examples, built) -> None:
    store = TopKStore(built)
    batch_ex = [examples[5], examples[0], examples[9]]
    b = collate(batch_ex, store, pad_token_id=7)
    t = max(len(ex["input_ids"]) for ex in batch_ex)
    assert b["input_ids"].shape == (3, t) and b["teacher_ids"].shape == (3, t, 5)
    assert b["teacher_ids"].dtype == torch.long and b["teacher_probs"].dtype == torch.float32
    assert b["target_mask"].dtype == torch.bool
    for j, ex in enumerate(batch_ex):
        n = len(ex["input_ids"])
        assert b["input_ids"][j, :n].tolist() == ex["input_ids"]
        assert (b["input_ids"][j, n:] == 7).all() and b["attention_mask"][j].sum() == n
        mask = b["target_mask"][j]
        assert mask[:n].tolist() == ex["target_mask"] and not mask[n:].any()
        tgt = np.flatnonzero(ex["target_mask"])
        assert b["labels"][j, tgt].tolist() == [ex["input_ids"][t + 1] for t in tgt]
        assert (b["labels"][j][~mask] == -100).all()
        ids, probs = store.get(ex["id"])
        assert torch.equal(b["teacher_ids"][j, tgt], torch.from_numpy(ids))
        assert torch.equal(b["teacher_probs"][j, tgt], torch.from_numpy(probs))
        assert (b["teacher_probs"][j][~mask] == 0).all() and (b["teacher_ids"][j][~mask] == 0).all()


# ------------------------------------------------------------------------- bad input, NaN


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": 0}, "k = 0"),
        ({"k": -2}, "k = -2"),
        ({"k": 301}, "k = 301"),
        ({"dtype": "fp8"}, "unknown store dtype"),
        ({"positions": "some"}, "unknown positions"),
        ({"process_index": 2, "num_processes": 2}, "process_index"),
    ],
)
def test_bad_arguments(model, examples, tmp_path, change, message) -> None:
    with pytest.raises(FirstError, match=message):
        extract_topk(model, examples, tmp_path / "s", **{**OPTS, **change})
    assert not list(tmp_path.glob("s/shard-*"))


@pytest.mark.parametrize(
    ("examples_", "message"),
    [
        ([], "empty split"),
        ([{"id": "a", "input_ids": [], "target_mask": []}], "no tokens"),
        ([{"id": "a", "input_ids": [1, 2], "target_mask": [True]}], "target_mask has 1"),
        ([{"id": "a", "input_ids": [1, 2], "target_mask": [False, True]}], "last position"),
        ([{"id": "a", "input_ids": [1, 999], "target_mask": [True, False]}], "outside"),
        ([{"id": "a", "input_ids": [1, 2], "target_mask": [False, False]}], "no positions"),
        ([{"id": "a", "input_ids": [1, 2], "target_mask": [True, False]}] * 2, "twice"),
        ([{"input_ids": [1, 2], "target_mask": [True, False]}], "lacks"),
    ],
)
def test_bad_examples(model, tmp_path, examples_, message) -> None:
    with pytest.raises(FirstError, match=message):
        extract_topk(model, examples_, tmp_path / "s", **OPTS)


def test_nan_teacher_refused(examples, tmp_path) -> None:
    bad = tiny_qwen()
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    out = tmp_path / "s"
    with pytest.raises(FirstError, match="NaN or inf.*refusing"):
        extract_topk(bad, examples, out, **OPTS)
    assert not list(out.glob("shard-*")) and not (out / "MANIFEST.json").exists()


@pytest.mark.parametrize(
    ("value", "message"), [(np.nan, "NaN or inf"), (np.inf, "NaN or inf"), (1.5, "outside")]
)
def test_validate_finds_bad_values(built, tmp_path, value, message) -> None:
    out = copy_of(built, tmp_path)
    f = out / "shard-00003" / "values.bin"
    vals = np.fromfile(f, dtype="<f2")
    vals[7] = value
    vals.tofile(f)
    with pytest.raises(FirstError, match=f"shard-00003.*{message}"):
        TopKStore(out).validate()


def test_validate_finds_out_of_range_ids_and_bad_hashes(built, tmp_path) -> None:
    out = copy_of(built, tmp_path)
    f = out / "shard-00002" / "ids_lo.bin"
    ids = np.fromfile(f, dtype="<u2")
    ids[3] = 300  # vocab is 300: ids 0..299
    ids.tofile(f)
    with pytest.raises(FirstError, match="shard-00002.*does not match its sha256"):
        TopKStore(out).validate(check_hashes=True)
    with pytest.raises(FirstError, match="shard-00002.*token id 300 outside"):
        TopKStore(out).validate()


def test_disk_full_removes_partial_shard(model, examples, built, tmp_path, monkeypatch) -> None:
    real = disk._write_file
    calls = {"n": 0}

    def failing(path, data):
        calls["n"] += 1
        if "shard-00001" in str(path) and path.name == "values.bin":
            real(path, bytes(data)[: len(data) // 2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(disk, "_write_file", failing)
    out = tmp_path / "s"
    with pytest.raises(FirstError, match="disk full.*shard-00001.*removed"):
        extract_topk(model, examples, out, **OPTS)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shard")) == ["shard-00000"]
    monkeypatch.setattr(disk, "_write_file", real)
    extract_topk(model, examples, out, **OPTS)  # resumes after space is freed
    assert tree_bytes(out) == tree_bytes(built)


def test_pickled_store_reopens_maps(built) -> None:
    import pickle

    store = TopKStore(built)
    store.example(0)
    clone = pickle.loads(pickle.dumps(store))  # as DataLoader workers receive it
    assert clone._shards == {}
    np.testing.assert_array_equal(clone.example(4)[0], store.example(4)[0])


@pytest.mark.parametrize("positions", ["targets", "all", None])
def test_forward_throughput_runs(model, examples, positions) -> None:
    """The reference forward: the LM head at the stored rows, or the plain full-logits forward."""
    tps = kn.forward_throughput(
        model, examples[:4], batch_size=2, autocast=False, positions=positions
    )
    assert tps > 0


def test_lse_paths_agree_with_logsumexp():
    """The eager in-place normaliser and the formula compiled (GPU, large bf16 chunks) give
    logsumexp."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 1000, generator=g) * 4
    ref = torch.logsumexp(logits.double(), -1)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        exact = torch.logsumexp(x.double(), -1)
        top, idx, lse = topk._topk_logits(x.clone(), 5)
        assert torch.allclose(lse.double(), exact, atol=1e-5)
        m = x.float().max(-1, keepdim=True).values
        assert torch.allclose(topk._lse_from_max(x, m).double(), exact, atol=1e-5)
        assert torch.equal(idx, torch.topk(x, 5).indices)
    assert torch.allclose(lse.double(), ref, atol=0.05)  # bf16 rounding of the inputs only


def _same_topk(values, ids, x, width):
    """values are x's top-`width` (exactly) and ids are distinct tokens that hold them."""
    ref = torch.topk(x, width, dim=-1)
    assert torch.equal(values, ref.values.float())
    assert torch.equal(x.gather(1, ids).float(), values)
    assert all(len(set(row.tolist())) == width for row in ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_path_matches_the_eager_one(monkeypatch, dtype):
    """Large CPU chunks take one compiled pass (group maxima and normaliser) and the grouped
    top-k: the same top values as the eager path, ids that hold them (tied logits, common in
    bf16, may name another of the tied tokens), and the same normaliser to fp32 rounding
    (summation order only), far below the float16 resolution of the stored probabilities
    (~5e-4). Where this process cannot compile, the library falls back to eager (a warning),
    and comparing eager with eager would test nothing: the test is then skipped with the
    reason, never passed."""
    import warnings

    x = (torch.randn(6, 64 * 40 + 17, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    monkeypatch.setattr(topk, "FUSE_MIN_LOGITS", 1 << 62)
    eager = topk._topk_logits(x.clone(), 5)
    monkeypatch.setattr(topk, "FUSE_MIN_LOGITS", x.numel())
    monkeypatch.setattr(topk, "_STATS_FUSED", None)  # compile here, whatever ran before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = topk._topk_logits(x.clone(), 5)
    fell_back = [str(w.message) for w in caught if "torch.compile unavailable" in str(w.message)]
    if fell_back:
        pytest.skip(fell_back[0])
    assert topk._STATS_FUSED is not topk._row_stats  # the compiled kernel ran
    _same_topk(fused[0], fused[1], x, 5)
    assert torch.equal(fused[0], eager[0])
    torch.testing.assert_close(fused[2], eager[2], rtol=0, atol=1e-5)
    exact = torch.logsumexp(x.double(), -1)
    assert torch.allclose(fused[2].double(), exact, atol=1e-5)


@pytest.mark.parametrize("vocab", [64 * 300, 64 * 300 + 37])
@pytest.mark.parametrize("width", [1, 5, 100])
def test_grouped_topk_is_the_top_k_of_the_whole_row(vocab, width):
    """The grouped top-k reads only the `width` groups with the largest maxima and the tail,
    yet returns each row's exact top `width`: on random rows, on rows whose largest values
    crowd into a few groups or into the ungrouped tail, and on integer-valued rows where
    nearly every value ties."""
    g = torch.Generator().manual_seed(width)
    rows = [torch.randn(vocab, generator=g)]
    crowded = torch.randn(vocab, generator=g)
    crowded[128 : 128 + 3 * 64] += 10  # the top 100 all in three consecutive groups
    rows.append(crowded)
    tail = torch.randn(vocab, generator=g)
    tail[-37:] += 10  # the largest in the tail (or the last group when there is none)
    rows.append(tail)
    rows.append(torch.randint(0, 4, (vocab,), generator=g).float())  # ties everywhere
    x = torch.stack(rows)
    maxima, lse = topk._row_stats(x)
    assert maxima.shape == (x.shape[0], vocab // topk.TOPK_GROUP)
    values, ids = topk._grouped_topk(x, maxima, width)
    _same_topk(values, ids, x, width)
    assert torch.allclose(lse.double(), torch.logsumexp(x.double(), -1), atol=1e-5)


def test_extraction_through_the_fused_cpu_path_matches_the_eager_store(monkeypatch, tmp_path):
    """A whole extraction through the compiled row statistics and the grouped top-k (forced on
    a small model: chunks of any size, groups of 8 logits of a 4,100-token vocabulary, so the
    coverage's top-100 runs grouped too) stores what the eager path stores: the same ids where
    no logits tie, probabilities and coverage to fp32 rounding."""
    teacher = tiny_qwen(vocab=4100)
    exs = make_examples(n=6, vocab=4100)
    eager = TopKStore(extract_topk(teacher, exs, tmp_path / "eager", **OPTS))
    monkeypatch.setattr(topk, "FUSE_MIN_LOGITS", 1)
    monkeypatch.setattr(topk, "TOPK_GROUP", 8)
    monkeypatch.setattr(topk, "_STATS_FUSED", None)
    calls = []
    grouped = topk._grouped_topk
    monkeypatch.setattr(topk, "_grouped_topk", lambda *a: calls.append(a[1].shape) or grouped(*a))
    fused = TopKStore(extract_topk(teacher, exs, tmp_path / "fused", **OPTS))
    assert calls and all(shape[1] == 4100 // 8 for shape in calls)
    for i in range(len(exs)):
        np.testing.assert_array_equal(fused.example(i)[0], eager.example(i)[0])
        np.testing.assert_allclose(fused.example(i)[1], eager.example(i)[1], rtol=1e-3, atol=1e-6)
    for q in ("mean", "min", "max"):
        np.testing.assert_allclose(
            fused.meta["coverage"][q], eager.meta["coverage"][q], rtol=1e-4, atol=1e-6
        )


def test_row_stats_pass_nan_and_inf_on():
    """A NaN or +inf logit makes the row's normaliser NaN (or inf), which extraction refuses
    (`test_nan_teacher_refused`); a grouped maximum must not hide it."""
    x = torch.randn(3, 64 * 10)
    x[0, 100] = float("nan")
    x[1, 5] = float("inf")
    _, lse = topk._row_stats(x)
    assert not torch.isfinite(lse[:2]).any() and torch.isfinite(lse[2])


def test_chunk_rows_bigger_on_gpu():
    cpu = topk._chunk_rows(151_936, torch.device("cpu"))
    gpu = topk._chunk_rows(151_936, torch.device("cuda"))
    assert cpu == 2**25 // 151_936 and gpu == 2**28 // 151_936
    assert topk._chunk_rows(2**30) == 1
