"""Evaluation on a tiny random Qwen2 model: record schema, probabilities, padding, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from first_lib import metrics
from first_lib.errors import FirstError
from first_lib.evaluate import (
    EvalConfig,
    evaluate_multiple_choice,
    last_token_logprobs,
    load_records,
    run_evaluation,
    summarize,
)
from first_lib.tasks import MCQuestion, encode, render_prompt
from tests.test_tasks import char_tokenizer

torch.set_num_threads(2)

RECORD_KEYS = {"id", "gold", "pred", "probs", "raw_probs", "confidence", "correct"}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(config).eval()
    # A random init gives almost uniform next-token distributions; sharpen them so that
    # errors in padding or positions show up as clear differences.
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


QUESTIONS = [
    MCQuestion("c0", "csqa", "Where?", ["here", "there", "nowhere", "up", "down"], 0),
    MCQuestion(
        "c1", "csqa", "Which of these is the longest option of all?", ["a", "b", "c", "d", "e"], 3
    ),
    MCQuestion("o0", "obqa", "Plants need", ["light", "rock", "tin", "song"], 0),
    MCQuestion("b0", "boolq", "is ice cold?", ["yes", "no"], 0, "Ice is frozen water."),
    MCQuestion("b1", "boolq", "is fire cold?", ["yes", "no"], 1, "Fire is hot, hotter than tea."),
    MCQuestion("a0", "arc_easy", "Which is a metal?", ["iron", "wood", "glass"], 0),
]


def test_records_schema_and_probabilities(model, tok):
    records = evaluate_multiple_choice(model, tok, QUESTIONS, batch_size=4, progress=False)
    assert [r["id"] for r in records] == [q.id for q in QUESTIONS]
    for q, r in zip(QUESTIONS, records, strict=True):
        assert set(r) == RECORD_KEYS
        assert len(r["probs"]) == len(r["raw_probs"]) == len(q.choices)
        assert sum(r["probs"]) == pytest.approx(1.0, abs=1e-5)  # renormalised over candidates
        assert 0.0 < sum(r["raw_probs"]) <= 1.0 + 1e-6
        assert r["pred"] == int(np.argmax(r["probs"])) == int(np.argmax(r["raw_probs"]))
        assert r["confidence"] == pytest.approx(r["probs"][r["pred"]])
        assert r["correct"] == (r["pred"] == q.gold) and r["gold"] == q.gold
        ratio = np.array(r["probs"]) / np.array(r["raw_probs"])
        assert ratio == pytest.approx(np.full(len(ratio), ratio[0]), rel=1e-4)
    json.dumps(records)  # JSON-ready


def test_raw_confidence_switch(model, tok):
    renorm = evaluate_multiple_choice(model, tok, QUESTIONS, progress=False)
    raw = evaluate_multiple_choice(model, tok, QUESTIONS, confidence="raw", progress=False)
    for a, b in zip(renorm, raw, strict=True):
        assert b["probs"] == b["raw_probs"] == pytest.approx(a["raw_probs"], abs=1e-6)
        assert b["pred"] == a["pred"]
        assert b["confidence"] <= a["confidence"] + 1e-6
    with pytest.raises(FirstError, match="confidence"):
        evaluate_multiple_choice(model, tok, QUESTIONS, confidence="max", progress=False)


def test_left_padding_does_not_change_results(model, tok):
    one = evaluate_multiple_choice(model, tok, QUESTIONS, batch_size=1, progress=False)
    four = evaluate_multiple_choice(model, tok, QUESTIONS, batch_size=4, progress=False)
    for a, b in zip(one, four, strict=True):
        assert a["raw_probs"] == pytest.approx(b["raw_probs"], abs=1e-5)
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)


def test_matches_an_unpadded_forward(model, tok):
    """The padded batch agrees with a plain forward pass of each prompt alone."""
    seqs = [encode(tok, render_prompt(q, tok, "chat"), "chat") for q in QUESTIONS]
    batched = last_token_logprobs(model, seqs, tok.pad_token_id)
    assert batched.shape == (len(QUESTIONS), len(tok)) and batched.dtype == torch.float32
    with torch.no_grad():
        for row, ids in enumerate(seqs):
            alone = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            assert torch.allclose(batched[row], alone, atol=1e-4)
    # The check can fail: attending to the pads (no attention mask) changes the answer.
    short, long_ = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))[:: len(seqs) - 1]
    ids = torch.full((2, len(seqs[long_])), tok.pad_token_id)
    ids[0, -len(seqs[short]) :] = torch.tensor(seqs[short])
    ids[1] = torch.tensor(seqs[long_])
    with torch.no_grad():
        unmasked = model(ids).logits[0, -1].float().log_softmax(-1)
    assert not torch.allclose(batched[short], unmasked, atol=1e-4)


def test_plain_style_and_autocast(model, tok):
    plain = evaluate_multiple_choice(model, tok, QUESTIONS, style="plain", progress=False)
    chat = evaluate_multiple_choice(model, tok, QUESTIONS, style="chat", progress=False)
    assert any(a["probs"] != b["probs"] for a, b in zip(plain, chat, strict=True))
    bf16 = evaluate_multiple_choice(model, tok, QUESTIONS, autocast=True, progress=False)
    for a, b in zip(chat, bf16, strict=True):
        assert set(b) == RECORD_KEYS
        assert sum(b["probs"]) == pytest.approx(1.0, abs=1e-5)
        assert a["probs"] == pytest.approx(b["probs"], abs=0.1)


def test_summarize_uses_the_metrics(model, tok):
    records = evaluate_multiple_choice(model, tok, QUESTIONS * 5, progress=False)
    s = summarize(records, n_boot=200, seed=0)
    conf = [r["confidence"] for r in records]
    correct = [r["correct"] for r in records]
    assert s["n"] == 30
    assert s["ece"] == pytest.approx(metrics.ece(conf, correct, 10))
    assert s["acc"] == pytest.approx(np.mean(correct))
    assert s["trust"] == pytest.approx(s["acc"] - s["ece"])
    lo, hi = s["acc_ci"]
    assert 0.0 <= lo <= s["acc"] <= hi <= 1.0
    assert 0.0 <= s["ece_ci"][0] <= s["ece_ci"][1] <= 1.0
    assert s["trust_ci"][0] <= s["trust_ci"][1]
    assert s["brier"] >= 0.0 and s["nll"] >= 0.0
    assert summarize(records, n_boot=200, seed=0) == s


def test_summarize_known_values():
    perfect = [
        {
            "id": str(i),
            "gold": 1,
            "pred": 1,
            "probs": [0.0, 1.0],
            "raw_probs": [0.0, 0.9],
            "confidence": 1.0,
            "correct": True,
        }
        for i in range(10)
    ]
    s = summarize(perfect, n_boot=50)
    assert (s["ece"], s["acc"], s["trust"], s["brier"]) == (0.0, 1.0, 1.0, 0.0)
    assert s["nll"] == pytest.approx(0.0)
    assert (s["ece_equal_mass"], s["smece"], s["aurc"]) == (0.0, 0.0, 0.0)
    wrong = [dict(r, pred=0, probs=[0.8, 0.2], confidence=0.8, correct=False) for r in perfect]
    s = summarize(wrong, n_boot=50)
    assert s["ece"] == pytest.approx(0.8) and s["acc"] == 0.0
    assert s["trust"] == pytest.approx(-0.8)
    assert s["brier"] == pytest.approx(0.64 + 0.64)
    assert s["nll"] == pytest.approx(-np.log(0.2))
    assert s["ece_equal_mass"] == pytest.approx(0.8) and s["smece"] == pytest.approx(0.8)
    assert s["aurc"] == 1.0  # every answer wrong: the risk is 1 at every coverage
    with pytest.raises(FirstError, match="no evaluation records"):
        summarize([])


def test_run_evaluation_writes_records_and_metrics(model, tok, tmp_path):
    config = EvalConfig(batch_size=3, n_boot=100)
    records, summary = run_evaluation(config, model, tok, QUESTIONS, tmp_path, progress=False)
    assert load_records(tmp_path / "records.jsonl") == records
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["batch_size"] == 3
    assert saved["ece"] == pytest.approx(summary["ece"])
    with pytest.raises(FirstError):
        EvalConfig(confidence="top1")
    with pytest.raises(FirstError):
        EvalConfig(batch_size=0)
