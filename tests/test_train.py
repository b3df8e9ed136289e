"""The training loop on TINY RANDOM MODELS: batching, resumption, and the CE/KD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from first_lib import flops, models, train
from first_lib.errors import FirstError
from first_lib.train import TrainConfig

torch.set_num_threads(1)


def _examples(n=24, seed=0, vocab=60):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(6, 14))
        ids = rng.integers(2, vocab, size=length).tolist()
        mask = [False] * length
        for t in rng.choice(length - 1, size=2, replace=False):
            mask[int(t)] = True
        out.append({"id": f"ex{i}", "input_ids": ids, "target_mask": mask})
    return out


def _model(vocab=64, seed=0):
    return models.make_tiny_model(vocab, size="student", seed=seed)


def test_collate_labels_and_padding():
    ex = _examples(3)
    batch = train.collate(ex, [0, 1, 2], None, pad_id=0)
    T = max(len(e["input_ids"]) for e in ex)
    assert batch["input_ids"].shape == (3, T)
    for b, e in enumerate(ex):
        n = len(e["input_ids"])
        assert batch["attention_mask"][b].sum() == n
        pos = batch["target_mask"][b].nonzero().squeeze(1).tolist()
        assert pos == [t for t in range(n - 1) if e["target_mask"][t]]
        for t in pos:
            assert batch["labels"][b, t] == e["input_ids"][t + 1]
        assert (batch["labels"][b][~batch["target_mask"][b]] == -100).all()


def test_collate_refuses_store_from_other_data():
    ex = _examples(2)

    def teacher(i):
        return np.zeros((5, 3), dtype=np.int64), np.full((5, 3), 1 / 3, dtype=np.float32)

    with pytest.raises(FirstError, match="other data"):
        train.collate(ex, [0], teacher, pad_id=0)


def test_epoch_batches_cover_every_example_once():
    batches = train.epoch_batches(23, 8, epoch=1, seed=3)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(23))
    assert batches == train.epoch_batches(23, 8, epoch=1, seed=3)
    assert batches != train.epoch_batches(23, 8, epoch=2, seed=3)


def _padded(batches, lengths) -> float:
    """pad_fraction of right-padded batches (`flops.pad_fraction`, as training reports it)."""
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return flops.pad_fraction(real, computed)


def _skewed_lengths(n=400, seed=0) -> list[int]:
    """Lognormal lengths (a long tail, like BoolQ's passages): 20 to ~1000 tokens."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(120), 0.7, size=n), 20, 1000).astype(int).tolist()


def test_bucketed_batches_cover_every_example_once_and_are_seeded():
    lengths = _skewed_lengths(203)
    batches = train.epoch_batches(203, 8, epoch=1, seed=3, lengths=lengths, pool=8)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))
    assert sorted(len(b) for b in batches)[1:] == [8] * 25  # one short batch, as unbucketed
    assert batches == train.epoch_batches(203, 8, epoch=1, seed=3, lengths=lengths, pool=8)
    assert batches != train.epoch_batches(203, 8, epoch=2, seed=3, lengths=lengths, pool=8)
    # The batches are not served in length order: the order of batches is shuffled too.
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # Without lengths: the plain seeded permutation, unchanged.
    order = np.random.default_rng([3, 1]).permutation(203).tolist()
    assert sum(train.epoch_batches(203, 8, epoch=1, seed=3), []) == order


def test_bucketing_bounds_the_padding_of_a_skewed_length_distribution():
    lengths = _skewed_lengths(400)
    plain = _padded(train.epoch_batches(400, 8, 0, 0), lengths)
    bucketed = _padded(train.epoch_batches(400, 8, 0, 0, lengths=lengths), lengths)
    assert plain > 0.3 and bucketed < 0.1, (plain, bucketed)


def test_training_records_its_model_work(precision):
    """`perf` in the log: FLOPs from the real tokens, padding counted, a positive mfu."""
    from first_lib import flops

    ex = _examples(16)
    cfg = TrainConfig(lr=1e-3, epochs=1, batch_size=4, lora_r=2, lora_targets=("q_proj",))
    _, log = train.train(_model(), ex, cfg, pad_id=0, progress=False, precision=precision)
    perf = log["perf"]
    assert perf["precision"] == precision and perf["device"] == "cpu"
    assert perf["real_tokens"] == sum(len(e["input_ids"]) for e in ex) == log["tokens"]
    assert perf["computed_tokens"] >= perf["real_tokens"]
    assert 0 <= perf["pad_fraction"] < 0.5
    assert 0 < perf["seconds"] <= log["seconds"]
    assert 0 < perf["mfu"] < 1.5 and perf["peak_gflops"] == round(flops.peak_gflops(precision), 1)


def _weights(model):
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("lora_r", [0, 4])
def test_resume_equals_uninterrupted(tmp_path, lora_r, precision):
    """Bit-identical at either precision: resumption replays the same operations in the same
    order, so bf16 rounding is the same in both runs."""
    ex = _examples(24)
    cfg = TrainConfig(
        lr=1e-2,
        epochs=2,
        batch_size=4,
        save_every=2,
        lora_r=lora_r,
        lora_targets=("q_proj", "v_proj"),
    )
    opts = {"pad_id": 0, "progress": False, "precision": precision}
    full, log_full = train.train(_model(), ex, cfg, **opts)
    assert log_full["precision"] == precision
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train.train(_model(), ex, cfg, work_dir=work, stop_after=5, **opts)
    assert (work / "checkpoint" / "state.json").exists()
    resumed, log_res = train.train(_model(), ex, cfg, work_dir=work, **opts)
    assert log_res["steps"] == log_full["steps"] == 12
    assert log_res["losses"] == pytest.approx(log_full["losses"], rel=1e-5, abs=1e-6)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_training_lowers_the_loss(precision):
    ex = _examples(16)
    cfg = TrainConfig(lr=3e-3, epochs=6, batch_size=8, warmup_ratio=0.0)
    _, log = train.train(_model(), ex, cfg, pad_id=0, progress=False, precision=precision)
    assert np.mean(log["losses"][-2:]) < np.mean(log["losses"][:2])


def test_kd_matches_teacher_distribution(precision):
    """KD towards a fixed top-k target moves the student's renormalised top-k towards it."""
    ex = _examples(8)
    k = 3
    target = np.array([0.7, 0.2, 0.1], dtype=np.float32)

    def teacher(i):
        n = sum(ex[i]["target_mask"][: len(ex[i]["input_ids"]) - 1])
        return np.tile(np.array([5, 6, 7]), (n, 1)), np.tile(target, (n, 1))

    cfg = TrainConfig(loss="kd", lr=1e-2, epochs=30, batch_size=8, warmup_ratio=0.0)
    model, log = train.train(
        _model(), ex, cfg, pad_id=0, teacher=teacher, progress=False, precision=precision
    )
    assert log["losses"][-1] < 0.1 * log["losses"][0]
    batch = train.collate(ex, list(range(8)), None, pad_id=0)
    with torch.no_grad():
        logits = train.TargetRowsLM(model.float())(
            batch["input_ids"], batch["attention_mask"], batch["target_mask"]
        )
    p = torch.softmax(logits[:, [5, 6, 7]], -1).mean(0).numpy()
    assert p == pytest.approx(target, abs=0.05)
    assert k == len(p)


def test_config_checks():
    with pytest.raises(FirstError):
        TrainConfig(loss="mse")
    with pytest.raises(FirstError):
        TrainConfig(transform="sharpen")
    with pytest.raises(FirstError):
        TrainConfig(lr=0)
    with pytest.raises(FirstError, match="store"):
        train.train(_model(), _examples(2), TrainConfig(loss="kd"), pad_id=0, progress=False)


def test_lora_is_merged_before_saving_so_evaluation_loads_a_plain_model(tmp_path):
    """Evaluation loads what training saved: one plain causal LM with the adapters merged into
    its weights (no PEFT wrapper, no adapter files, no extra matmuls at evaluation)."""
    ex = _examples(8)
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, lora_r=2, lora_targets=("q_proj", "v_proj"))
    trained, _ = train.train(_model(), ex, cfg, pad_id=0, progress=False, precision="fp32")
    trained.save_pretrained(tmp_path, safe_serialization=True)
    assert not (tmp_path / "adapter_config.json").exists()
    loaded = models.load_model(tmp_path, dtype=torch.float32)
    assert type(loaded) is type(_model()) and not hasattr(loaded, "peft_config")
    assert not any("lora" in name for name, _ in loaded.named_modules())
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(loaded.state_dict()[q], _model().state_dict()[q])  # the delta is in
    ids = torch.tensor([ex[0]["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, trained.float().eval()(ids).logits)
