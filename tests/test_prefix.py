"""Frozen-prefix reuse (`first_lib.prefix`) on TINY RANDOM MODELS: the cached path gives the
plain path's losses, adapter gradients and next-token probabilities; the cache key covers what
the bottom states depend on and nothing else; a damaged cache entry is recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from first_lib import evaluate, fastpath, models, prefix, train
from first_lib.train import TrainConfig

torch.set_num_threads(1)

N_LAYERS, TOP = 4, 2  # the tiny teacher has 4 decoder layers; LoRA on the top 2
IDX = [0, 3, 5, 7]  # one training batch


def _examples(n: int = 12, seed: int = 0) -> list[dict]:
    """n examples of 6 to 39 tokens (ids below 60; long enough for differently padded batches
    to take other attention kernels, which round differently), three targets each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, 40, size=n)
    ids = [rng.integers(2, 60, size=m).tolist() for m in lengths]
    marks = [set(rng.choice(m - 1, size=3, replace=False).tolist()) for m in lengths]
    return [
        {"id": f"ex{i}", "input_ids": x, "target_mask": [t in marks[i] for t in range(len(x))]}
        for i, x in enumerate(ids)
    ]


def _lora_model(bf16: bool):
    """The tiny teacher with LoRA on its top 2 layers, adapters set to random (non-zero) values
    so that every adapter matrix gets a gradient."""
    cfg = TrainConfig(lora_r=4, lora_layers=TOP, lora_targets=("q_proj", "v_proj", "up_proj"))
    model = train.prepare_model(models.make_tiny_model(64, "teacher"), cfg, bf16=bf16)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, cfg


def _step(model, cfg, batch, bf16: bool, states=None):
    """Loss, adapter gradients and target-row probabilities of one micro-batch."""
    model.zero_grad()
    wrapped = train.TargetRowsLM(model, prefix.n_frozen(model, TOP))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = wrapped(batch["input_ids"], batch["attention_mask"], batch["target_mask"], states)
    loss = train.step_loss(logits.float(), batch, cfg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, logits.detach().float().softmax(-1)


def _grad_error(a: dict, b: dict) -> float:
    """Largest relative difference (in norm) between two sets of gradients."""
    return max(float((a[n] - b[n]).norm() / a[n].norm()) for n in a)


# What the cached path may differ by when the bottom states were computed in other batches than
# the plain pass (as in training: all examples at once, by length). The two paths run the same
# operations; batch composition only changes rounding (a batch padded to another length, or not
# padded at all, takes other attention and matrix kernels). Measured on a 2-core Xeon with
# AVX512-BF16 (relative loss difference, relative gradient difference in norm, largest
# probability difference): fp32 0, 1.2e-6, 1.1e-8 (evaluation: 9.3e-9); bf16 1.2e-5, 1.6e-2,
# 1.2e-4 (evaluation: 9.3e-5). bf16 keeps 8 bits of mantissa (0.4% a rounding) and the
# adapters' gradients are products of rounded activations and rounded upstream gradients: the
# plain path itself moves them by 0.7% to 8% when one example is computed alone instead of
# padded next to a longer one. The bf16 bounds sit above that spread; the fp32 ones are 1e-5.
TOLERANCE = {
    "fp32": {"loss": 1e-5, "grads": 1e-5, "probs": 1e-5},
    "bf16": {"loss": 1e-3, "grads": 0.15, "probs": 2e-3},
}


def test_training_step_matches_plain_path(precision):
    bf16 = precision == "bf16"
    ex = _examples(12)
    model, cfg = _lora_model(bf16)
    n_bottom = prefix.n_frozen(model, TOP)
    assert n_bottom == N_LAYERS - TOP
    batch = train.collate(ex, IDX, None, pad_id=0)
    # The bottom of this very batch: the same operations in the same order, bit for bit (with
    # `sdpa` on both paths: the training attention takes another kernel with gradients on).
    model.set_attn_implementation("sdpa")
    plain = _step(model, cfg, batch, bf16)
    same = prefix.bottom_states(model, [ex[i]["input_ids"] for i in IDX], n_bottom, 4, bf16)
    exact = _step(model, cfg, batch, bf16, prefix.pad_states(same)[0])
    assert exact[0] == plain[0]
    for name, g in plain[1].items():
        torch.testing.assert_close(exact[1][name], g, rtol=0, atol=0, msg=name)

    # The bottom of every example computed once, in other batches (as `train.train` does), the
    # top with the training attention, against the plain path as training runs it.
    model.set_attn_implementation(fastpath.ATTENTION)
    plain = _step(model, cfg, batch, bf16)
    every = prefix.bottom_states(model, [e["input_ids"] for e in ex], n_bottom, 5, bf16)
    assert every[0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    loss, grads, probs = _step(
        model, cfg, batch, bf16, prefix.pad_states([every[i] for i in IDX])[0]
    )
    tol = TOLERANCE[precision]
    assert abs(loss - plain[0]) <= tol["loss"] * abs(plain[0])
    assert _grad_error(plain[1], grads) <= tol["grads"]
    assert float((probs - plain[2]).abs().max()) <= tol["probs"]


def test_next_token_probabilities_match_plain_path(precision):
    """Evaluation: left padding, explicit positions, the LM head at the last position."""
    bf16 = precision == "bf16"
    model = models.make_tiny_model(64, "teacher").to(torch.bfloat16 if bf16 else torch.float32)
    seqs = [e["input_ids"] for e in _examples(12)]
    with torch.inference_mode():
        plain = evaluate.last_token_logprobs(model, seqs, pad_id=0, autocast=bf16)
        states = prefix.bottom_states(model, seqs, N_LAYERS - TOP, batch_size=5, autocast=bf16)
        cached = prefix.last_token_logprobs(model, states, N_LAYERS - TOP, autocast=bf16)
    # measured: fp32 9.3e-9, bf16 9.3e-5 (see TOLERANCE)
    diff = float((plain.exp() - cached.exp()).abs().max())
    assert diff <= TOLERANCE[precision]["probs"]


def test_training_with_reuse_matches_plain_training():
    """`train.train` end to end at fp32: the same losses with and without prefix reuse."""
    ex = _examples(16)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, lora_r=4, lora_layers=1)
    opts = {"pad_id": 0, "progress": False, "precision": "fp32"}
    _, plain = train.train(
        models.make_tiny_model(64, "student"), ex, cfg, prefix_reuse=False, **opts
    )
    _, reused = train.train(models.make_tiny_model(64, "student"), ex, cfg, **opts)
    assert plain["prefix"]["bottom_layers"] == 0 and reused["prefix"]["bottom_layers"] == 1
    assert reused["losses"] == pytest.approx(plain["losses"], rel=1e-5, abs=1e-6)


def test_resume_with_reuse_is_bit_identical(tmp_path, precision):
    """Checkpoints and the disk cache: an interrupted run resumes to the same weights."""
    ex = _examples(16)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, save_every=2, lora_r=4, lora_layers=1)
    opts = {"pad_id": 0, "progress": False, "precision": precision}
    full, log_full = train.train(models.make_tiny_model(64, "student"), ex, cfg, **opts)
    cache = tmp_path / "prefix"
    work = tmp_path / "work"
    with pytest.raises(KeyboardInterrupt):
        train.train(
            models.make_tiny_model(64, "student"),
            ex,
            cfg,
            work_dir=work,
            stop_after=3,
            prefix_cache=cache,
            **opts,
        )
    assert len(list(cache.glob("*/meta.json"))) == 1
    resumed, log_res = train.train(
        models.make_tiny_model(64, "student"), ex, cfg, work_dir=work, prefix_cache=cache, **opts
    )
    assert log_res["losses"] == log_full["losses"]
    a, b = full.state_dict(), resumed.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_all_layers_take_the_ordinary_path():
    model = models.make_tiny_model(64, "teacher")
    assert [prefix.n_frozen(model, top) for top in (0, 1, 3, 4, 9)] == [0, 3, 1, 0, 0]
    ex = _examples(8)
    configs = [TrainConfig(epochs=1, batch_size=4, lora_r=4, lora_layers=top) for top in (0, 4)]
    configs.append(TrainConfig(epochs=1, batch_size=4, lora_layers=1))  # full FT: lora_r = 0
    for cfg in configs:
        fresh = models.make_tiny_model(64, "teacher")
        _, log = train.train(fresh, ex, cfg, pad_id=0, progress=False, precision="fp32")
        assert log["prefix"]["bottom_layers"] == 0


def _key(model, seqs, n_bottom=2, autocast=False):
    from first_lib import pipeline

    return pipeline.config_hash(prefix.cache_key(model, seqs, n_bottom, autocast))


def test_cache_key_covers_bottom_precision_split_and_tokens():
    seqs = [e["input_ids"] for e in _examples(4)]
    model = models.make_tiny_model(64, "teacher")
    base = _key(model, seqs)
    assert _key(models.make_tiny_model(64, "teacher"), seqs) == base  # same weights, same key
    assert _key(model, seqs, n_bottom=1) != base  # layer split
    assert _key(model, seqs, autocast=True) != base  # precision: bf16 autocast
    assert _key(models.make_tiny_model(64, "teacher").to(torch.bfloat16), seqs) != base
    assert _key(model, seqs[:3]) != base  # tokenisation
    assert _key(model, [s[:-1] for s in seqs]) != base
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # a top layer: same bottom
        model.lm_head.weight.add_(1.0)
    assert _key(model, seqs) == base
    lora, _ = _lora_model(bf16=False)  # LoRA on the top layers only
    assert _key(lora, seqs) == base
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3  # a bottom layer
    assert _key(model, seqs) != base
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[0, 0] -= 1e-3
        model.model.embed_tokens.weight[63, 0] += 1e-3  # the row of a token no sequence uses
    assert _key(model, seqs) == base
    with torch.no_grad():
        model.model.embed_tokens.weight[seqs[0][0], 0] += 1e-3  # a row in use
    assert _key(model, seqs) != base


def test_merged_variant_shares_the_bottom_of_its_base(tmp_path):
    """A LoRA-trained, merged and saved (bf16) variant has bitwise the bottom of its base loaded
    at bf16, so they share one cache entry at bf16. At fp32 they share it only where the base's
    weights are bf16 numbers (the real Qwen checkpoints are bf16; the tiny ones are fp32)."""
    ex = _examples(8)
    base = models.make_tiny_model(64, "teacher")
    base.save_pretrained(tmp_path / "base")
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4, lora_r=4, lora_layers=TOP)
    tuned, _ = train.train(base, ex, cfg, pad_id=0, progress=False, precision="bf16")
    tuned.save_pretrained(tmp_path / "tuned")
    seqs = [e["input_ids"] for e in ex]
    load = models.load_model
    for dtype, shared in ((torch.bfloat16, True), (torch.float32, False)):
        a, b = load(tmp_path / "base", dtype=dtype), load(tmp_path / "tuned", dtype=dtype)
        assert (_key(a, seqs) == _key(b, seqs)) is shared
        assert prefix.bottom_weights_hash(a, N_LAYERS) != prefix.bottom_weights_hash(b, N_LAYERS)


def test_corrupt_cache_entry_is_detected_and_recomputed(tmp_path):
    model = models.make_tiny_model(64, "teacher")
    seqs = [e["input_ids"] for e in _examples(6)]
    first = prefix.cached_bottom_states(model, seqs, 2, root=tmp_path)
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (entry / "meta.json").exists() and not list(tmp_path.glob("*.tmp"))
    states = entry / prefix.STATES_FILE
    data = bytearray(states.read_bytes())
    data[-8:] = bytes(8)  # same size, other bytes
    states.write_bytes(bytes(data))
    said: list[str] = []
    again = prefix.cached_bottom_states(model, seqs, 2, root=tmp_path, log=said.append)
    assert len(said) == 1 and "sha256" in said[0]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    (entry / "meta.json").write_text("{")  # a torn meta.json
    prefix.cached_bottom_states(model, seqs, 2, root=tmp_path, log=said.append)
    assert (
        len(said) == 2 and prefix._load(entry, prefix.cache_key(model, seqs, 2, False))[1] is None
    )


def test_pipeline_shares_bottom_states_between_stages(tmp_path, monkeypatch):
    """A tiny run with LoRA on the top layers, at bf16: one cache entry for the teacher's
    training data (shared by its training and the extraction over them), one for its validation
    data, one for the student's training data (shared by its four trainings), and one per model
    for the test questions (shared by the untuned model and its tuned variants)."""
    from first_lib import pipeline
    from tests.conftest import isolated_home

    monkeypatch.setenv("FIRST_HOME", str(isolated_home(tmp_path)))
    lora = {"teacher_train.lora_r": 4, "teacher_train.lora_layers": 2}
    lora.update({"student_train.lora_r": 4, "student_train.lora_layers": 1})
    said: list[str] = []
    res = pipeline.run(
        "tiny", "csqa", log=said.append, precision="bf16", n_train=24, n_val=12, n_test=16, **lora
    )
    assert set(res["variants"]) == set(pipeline.VARIANTS) | set(pipeline.POSTHOC)
    entries = [pipeline.read_meta(p)["key"] for p in prefix.cache_root().glob("*/")]
    splits = sorted((k["layers"][1], k["n"]) for k in entries)
    # (1, 12): the students evaluated on the validation questions (post-hoc TS)
    assert splits == [(1, 12), (1, 16), (1, 24), (2, 12), (2, 16), (2, 24)], splits
    store = Path(res["artefacts"]["store"]) / "train"
    assert json.loads((store / "config.json").read_text())["bottom_layers"] == 2


def test_extraction_from_cached_states_matches_plain_extraction(tmp_path):
    """The tuned teacher's top-k store from its cached bottom (fp32): the same tokens, the same
    probabilities up to the store's fp16 rounding (one step of 2^-11 near 1)."""
    from first_lib import knowledge

    ex = _examples(10)
    model = models.make_tiny_model(64, "teacher")
    opts = {"k": 3, "batch_size": 4, "progress": False, "autocast": False}
    plain = knowledge.extract_topk(model, ex, tmp_path / "plain", **opts)
    cached = knowledge.extract_topk(
        model, ex, tmp_path / "cached", top_layers=TOP, prefix_cache=tmp_path / "prefix", **opts
    )
    a, b = knowledge.TopKStore(plain), knowledge.TopKStore(cached)
    assert b.meta["n_positions"] == a.meta["n_positions"] > 0
    for i in range(len(ex)):
        (ids_a, p_a), (ids_b, p_b) = a.example(i), b.example(i)
        np.testing.assert_array_equal(ids_a, ids_b)
        np.testing.assert_allclose(p_a, p_b, atol=1e-3)
    assert len(list((tmp_path / "prefix").glob("*/meta.json"))) == 1


@pytest.mark.slow
def test_two_processes_with_reuse_match_one(tmp_path):
    """accelerate with 2 CPU processes (gloo) and LoRA on the top layers: the forward goes
    through the DDP-wrapped module with cached bottom states; the metrics match 1 process's.
    About 30 s on two cores."""
    import os

    from tests.conftest import isolated_home
    from tests.test_pipeline import _first_run

    sets = {"teacher_train.lora_r": 4, "teacher_train.lora_layers": 2, "n_train": 32}
    sets.update({"student_train.lora_r": 4, "student_train.lora_layers": 1, "n_test": 16})
    extra = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    results = {}
    for n, launcher in ((1, ()), (2, ("torch.distributed.run", "--nproc_per_node", "2"))):
        (tmp_path / f"p{n}").mkdir()
        home = isolated_home(tmp_path / f"p{n}")
        env = {**os.environ, "FIRST_HOME": str(home), "FIRST_PRECISION": "fp32"}
        per_process = [] if n == 1 else ["--set", "teacher_train.batch_size=4"]
        per_process += [] if n == 1 else ["--set", "student_train.batch_size=4"]
        _first_run(tmp_path / f"out{n}", env, launcher, *extra, *per_process)
        results[n] = json.loads((tmp_path / f"out{n}" / "results.json").read_text())
        assert len(list((home / "prefix").glob("*/meta.json"))) >= 4
    for variant in results[1]["variants"]:
        for key in ("ece", "acc"):
            one, two = results[1]["variants"][variant][key], results[2]["variants"][variant][key]
            assert two == pytest.approx(one, abs=0.02), (variant, key)


# ----------------------------------------------------------------------------- fused LoRA forward

# `fastpath.fuse_lora` against PEFT's own forward, on the same adapters and batch. At fp32 both
# compute W x + s B (A x) in fp32; only the order of the last sum and scaling differs. At bf16
# PEFT rounds B (A x) to bf16, scales and rounds the sum again; the fused `addmm` accumulates in
# fp32 and rounds once, so the two paths differ by bf16 roundings of the adapters' outputs.
# Measured on a 2-core Xeon with AVX512-BF16 (relative loss, relative gradient in norm, largest
# probability difference): fp32 0, 0, 0 (the scaling is a power of two, so both orders round
# alike); bf16 1.8e-6, 2.0e-2, 1.0e-4. The bounds sit above those; a fused forward that drops
# the scaling fails both.
FUSED_TOLERANCE = {
    "fp32": {"loss": 1e-6, "grads": 1e-5, "probs": 1e-6},
    "bf16": {"loss": 1e-2, "grads": 0.05, "probs": 5e-3},
}


def test_fused_lora_matches_peft_forward(precision):
    bf16 = precision == "bf16"
    ex = _examples(12)
    batch = train.collate(ex, IDX, None, pad_id=0)
    fused, cfg = _lora_model(bf16)
    n_lora = sum(1 for m in fused.modules() if hasattr(m, "lora_A"))
    assert n_lora == TOP * len(cfg.lora_targets)
    assert sum(1 for m in fused.modules() if "forward" in vars(m)) == n_lora  # all fused
    peft_own, _ = _lora_model(bf16)
    for m in peft_own.modules():
        vars(m).pop("forward", None)  # back to PEFT's forward
    peft_own.load_state_dict(fused.state_dict())
    a = _step(fused, cfg, batch, bf16)
    b = _step(peft_own, cfg, batch, bf16)
    tol = FUSED_TOLERANCE[precision]
    assert abs(a[0] - b[0]) <= tol["loss"] * abs(b[0])
    assert _grad_error(b[1], a[1]) <= tol["grads"]
    assert float((a[2] - b[2]).abs().max()) <= tol["probs"]
    # without autocast, a bf16 base with fp32 adapters takes PEFT's path (it casts the input)
    if bf16:
        layer = next(m for m in fused.modules() if "forward" in vars(m))
        x = torch.randn(3, layer.base_layer.in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(layer(x), type(layer).forward(layer, x))


# `fastpath.use_training_attention` against transformers' `sdpa`, on a padded batch and on one
# unpadded sequence (where no mask is passed). The short path is softmax(q k^T s + mask) v in
# matrix products, the fused kernel computes the same blockwise with an online softmax: at fp32
# they differ in the last bits, at bf16 by bf16 roundings of scores and probabilities.
# Measured on a 2-core Xeon with AVX512-BF16 (relative loss, relative gradient in norm, largest
# probability difference; padded batch, one sequence): fp32 0 / 0, 1.2e-6 / 9.2e-7, 7.5e-9 /
# 7.5e-9; bf16 1.4e-5 / 2.5e-6, 1.9e-2 / 2.1e-2, 9.6e-5 / 9.2e-5 (the same spread as the fused
# LoRA forward's above: the adapters' gradients are products of bf16-rounded activations).
ATTENTION_TOLERANCE = {
    "fp32": {"loss": 1e-6, "grads": 1e-5, "probs": 1e-6},
    "bf16": {"loss": 1e-3, "grads": 0.05, "probs": 1e-3},
}


@pytest.mark.parametrize("idx", [IDX, [3]], ids=["padded", "one"])
def test_training_attention_matches_sdpa(precision, idx, monkeypatch):
    bf16 = precision == "bf16"
    ex = _examples(12)
    batch = train.collate(ex, idx, None, pad_id=0)
    model, cfg = _lora_model(bf16)
    assert model.config._attn_implementation == fastpath.ATTENTION
    ours = _step(model, cfg, batch, bf16)
    monkeypatch.setattr(fastpath, "SHORT_ATTENTION", -1)  # every length to sdpa: its very numbers
    routed = _step(model, cfg, batch, bf16)
    model.set_attn_implementation("sdpa")
    fused = _step(model, cfg, batch, bf16)
    assert routed[0] == fused[0] and _grad_error(fused[1], routed[1]) == 0
    tol = ATTENTION_TOLERANCE[precision]
    assert abs(ours[0] - fused[0]) <= tol["loss"] * abs(fused[0])
    assert _grad_error(fused[1], ours[1]) <= tol["grads"]
    assert float((ours[2] - fused[2]).abs().max()) <= tol["probs"]
    # the saved model loads in a fresh process, where the training attention is not registered
    assert train.finalize_model(_lora_model(bf16)[0]).config._attn_implementation == "sdpa"
