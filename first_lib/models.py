"""Loading models and tokenizers by name, the shared-vocabulary check, and tiny random models.

A model is named in one of three ways (`resolve_model`):
- a source name from `first_lib.assets.SOURCES` (offline; fetched and converted on first use),
- a local folder holding a `transformers` checkpoint,
- a hub id such as `Qwen/Qwen2.5-Coder-0.5B-Instruct` (needs a reachable hub or the HF cache).

Token-level distillation compares the teacher's and the student's distributions id by id, so
both must share one vocabulary: `check_same_vocabulary` refuses otherwise.

The tiny models (`make_tiny_tokenizer`, `make_tiny_model`, `save_tiny_pair`) are *random*: they
make the pipeline run in seconds for tests and say nothing about the method's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

import torch

from first_lib import assets
from first_lib.errors import FirstError

# --------------------------------------------------------------------------------------------
# Resolving and loading
# --------------------------------------------------------------------------------------------


def resolve_model(name_or_path: str | os.PathLike) -> str | Path:
    """A source name -> its converted checkpoint folder; a local path -> itself; else a hub id."""
    text = str(name_or_path)
    if text in assets.SOURCES:
        source = assets.SOURCES[text]
        if not source.is_model:
            raise FirstError(f"{text!r} is a data source, not a model")
        return assets.ensure(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    return text


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect (quick, so offline machines fail fast)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host or "huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader, target: str | Path, **kwargs):
    """`loader.from_pretrained(target)`, turning an unreachable hub into a clear FirstError.

    Never runs repository code (`trust_remote_code=False`). A hub id is tried from the local HF
    cache only when the hub is unreachable, instead of retrying for a minute.
    """
    kwargs["trust_remote_code"] = False
    if isinstance(target, Path):
        return loader.from_pretrained(target, **kwargs)
    online = _hub_reachable()
    try:
        return loader.from_pretrained(target, local_files_only=not online, **kwargs)
    except (OSError, ValueError) as err:
        offline = ", ".join(n for n, s in assets.SOURCES.items() if s.is_model)
        where = "could not be loaded from the hub" if online else "the model hub is unreachable"
        raise FirstError(
            f"{target!r} is not an offline source name nor a local path, and {where} "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
            f"Offline names: {offline}"
        ) from None


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """A causal LM in eval mode from a source name, local folder or hub id (safetensors only)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    target = resolve_model(name_or_path)
    model = _from_pretrained(AutoModelForCausalLM, target, dtype=dtype, use_safetensors=True)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer of a source name, local folder or hub id, with `pad_token` always set.

    The padding side is left as saved; callers that batch prompts for next-token scoring set
    `tokenizer.padding_side = "left"` themselves.
    """
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FirstError(f"tokenizer of {name_or_path!s} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def next_token_top_k(
    model, tokenizer, prompt: str, k: int = 5, chat: bool = True
) -> list[tuple[int, str, float]]:
    """The k most likely next tokens after `prompt`: `[(token_id, text, probability)]`.

    With `chat=True` the prompt is the user turn of the tokenizer's chat template, with the
    assistant turn opened. Probabilities are a softmax over the full vocabulary, in float32.
    """
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), logits_to_keep=1).logits[0, -1]  # [V]
    probs = torch.softmax(logits.float(), dim=-1)
    top = torch.topk(probs, k)
    return [
        (int(i), tokenizer.decode([int(i)]), float(p))
        for p, i in zip(top.values, top.indices, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Shared vocabulary
# --------------------------------------------------------------------------------------------

# Strings whose ids must agree between teacher and student: letters, answer cues, words, digits,
# unicode, code, whitespace and chat markup (which exercises the special tokens).
VOCAB_PROBES: tuple[str, ...] = (
    *"abcdefghijklmnopqrstuvwxyz",
    *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    " a",
    " b",
    " c",
    " d",
    " e",
    "(a",
    " yes",
    " no",
    "yes",
    "no",
    "Q: Which city is farther north, Oslo or Helsinki?\nA: The answer is (",
    "the quick brown fox jumps over the lazy dog",
    "Photosynthesis converts light energy into chemical energy.",
    "0123456789",
    "3.14159 2024 -17 1e-5 100,000",
    "café naïve façade Zürich",
    "日本語のテキスト",
    "Привет, мир",
    "emoji 🙂🚀",
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "\n\n\t  ",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
)

_SPECIAL = ("eos_token_id", "pad_token_id", "bos_token_id", "unk_token_id")


def check_same_vocabulary(
    teacher_tok,
    student_tok,
    teacher_vocab_size: int | None = None,
    student_vocab_size: int | None = None,
    probes: Iterable[str] = VOCAB_PROBES,
) -> dict:
    """Refuse (FirstError) unless teacher and student tokenize identically.

    Checks, in order: the ids of every probe string, the special token ids (eos, pad, bos,
    unk), `len(tokenizer)`, the whole token -> id table, and that every real token id is below
    both embedding sizes (`*_vocab_size`, the models' `config.vocab_size` or embedding rows).
    Embedding sizes may differ by padding (e.g. 151,936 vs 152,064). Returns a summary dict.
    """
    probes = list(probes)
    for text in probes:
        t_ids = teacher_tok.encode(text, add_special_tokens=False)
        s_ids = student_tok.encode(text, add_special_tokens=False)
        if t_ids != s_ids:
            raise FirstError(
                f"teacher and student tokenizers differ on probe {text!r}: teacher ids "
                f"{t_ids[:12]}, student ids {s_ids[:12]}; token-level distillation needs one "
                f"shared vocabulary"
            )
    for attr in _SPECIAL:
        t_id, s_id = getattr(teacher_tok, attr, None), getattr(student_tok, attr, None)
        if t_id != s_id:
            raise FirstError(
                f"teacher and student tokenizers differ on special token {attr}: "
                f"teacher {t_id}, student {s_id}"
            )
    if len(teacher_tok) != len(student_tok):
        raise FirstError(
            f"teacher and student tokenizers differ in size: teacher {len(teacher_tok)}, "
            f"student {len(student_tok)}"
        )
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: t for t, i in t_vocab.items()}
        s_by_id = {i: t for t, i in s_vocab.items()}
        first = min(i for i in set(t_by_id) | set(s_by_id) if t_by_id.get(i) != s_by_id.get(i))
        raise FirstError(
            f"teacher and student tokenizers differ at token id {first}: teacher "
            f"{t_by_id.get(first)!r}, student {s_by_id.get(first)!r}"
        )
    n_ids = max(len(teacher_tok), max(t_vocab.values()) + 1)  # ids in use: 0 .. n_ids - 1
    for who, size in (("teacher", teacher_vocab_size), ("student", student_vocab_size)):
        if size is not None and size < n_ids:
            raise FirstError(
                f"the {who}'s embedding has {size} rows but the tokenizer uses ids up to "
                f"{n_ids - 1}: its vocabulary is smaller than the tokenizer's"
            )
    return {
        "tokenizer_size": len(teacher_tok),
        "ids_in_use": n_ids,
        "probes": len(probes),
        "teacher_vocab_size": teacher_vocab_size,
        "student_vocab_size": student_vocab_size,
        "padded": teacher_vocab_size != student_vocab_size,
    }


# --------------------------------------------------------------------------------------------
# Tiny random models (for tests and the `tiny` profile)
# --------------------------------------------------------------------------------------------

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
DEFAULT_EXTRA_TOKENS: tuple[str, ...] = (
    *"abcde",
    *"ABCDE",
    " a",
    " b",
    " c",
    " d",
    " e",
    "yes",
    "no",
    " yes",
    " no",
)


def make_tiny_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 512,
    extra_tokens: Sequence[str] = DEFAULT_EXTRA_TOKENS,
):
    """A small byte-level BPE trained on `texts` (deterministic), as a `Qwen2Tokenizer`.

    The pipeline is Qwen2's (NFC, its split regex, byte-level), so the tokenizer reloads
    identically next to a Qwen2 config. Every string in `extra_tokens` encodes to exactly one
    token: strings the trainer did not learn get merge rules appended (lowest priority), so
    ordinary text tokenizes as trained. `len(tokenizer) <= vocab_size`; eos is `<|endoftext|>`,
    pad is `<|pad|>`; no chat template (plain prompts).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(extra_tokens), 256 + 2),
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    vocab, merges = _force_single_tokens(tok, extra_tokens)
    if len(vocab) > vocab_size:
        raise FirstError(
            f"tiny tokenizer has {len(vocab)} tokens, more than vocab_size={vocab_size}"
        )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m) for m in merges],
        unk_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )
    for text in extra_tokens:
        if len(tokenizer.encode(text, add_special_tokens=False)) != 1:
            raise FirstError(f"could not make {text!r} a single token")
    return tokenizer


def _force_single_tokens(tok, strings: Sequence[str]) -> tuple[dict[str, int], list]:
    """Vocab and merges of a trained BPE `tok`, extended so each of `strings` is one token."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges: list = spec["model"]["merges"]
    for text in strings:
        # The pre-tokenizer must keep the string in one word, or no merge can join it.
        if len(tok.pre_tokenizer.pre_tokenize_str(text)) != 1:
            raise FirstError(f"cannot make {text!r} one token: the pre-tokenizer splits it")
        pieces = Tokenizer.from_str(json.dumps(spec)).encode(text).tokens
        left = pieces[0]
        for right in pieces[1:]:
            merges.append([left, right])
            left = left + right
            if left not in vocab:
                vocab[left] = max(vocab.values()) + 1
    return vocab, merges


_TINY_SIZES = {
    # hidden, intermediate, layers, heads, kv heads
    "teacher": (128, 256, 4, 4, 2),
    "student": (64, 128, 2, 4, 2),
}


def make_tiny_model(
    vocab_size: int,
    size: str = "teacher",
    seed: int = 0,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
):
    """A *randomly initialised* tiny `Qwen2ForCausalLM` (teacher ~4 layers x 128, student 2 x 64).

    Deterministic given `seed` (the global RNG is left untouched). Untied output matrix, as in
    the converted Qwen2.5-Coder models. For tests and the tiny profile only.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if size not in _TINY_SIZES:
        raise FirstError(f"tiny model size must be one of {sorted(_TINY_SIZES)}, got {size!r}")
    hidden, inter, layers, heads, kv_heads = _TINY_SIZES[size]
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.config.name_or_path = f"tiny-random-qwen2-{size}"
    return model.eval()


def save_tiny_pair(
    directory: str | os.PathLike, texts: Sequence[str], seed: int = 0, vocab_size: int = 512
) -> dict[str, Path]:
    """Write a *random tiny* teacher and student sharing one tiny tokenizer; return their folders.

    Layout: `directory/teacher/`, `directory/student/`, each a loadable checkpoint (safetensors)
    with the tokenizer and a `tiny.json` saying it is random. The student uses `seed + 1`.
    """
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer(texts, vocab_size=vocab_size)
    out = {}
    for offset, size in enumerate(("teacher", "student")):
        model = make_tiny_model(
            len(tokenizer),
            size,
            seed + offset,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        final = directory / size
        tmp = directory / f".{size}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"kind": "tiny-random", "size": size, "seed": seed + offset, "texts": len(texts)}
        (tmp / "tiny.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        out[size] = final
    return out


# ----------------------------------------------------------------------------- CLI


def _cmd_peek(args: argparse.Namespace) -> int:
    for name in args.names:
        start = time.perf_counter()
        tokenizer = load_tokenizer(name)
        model = load_model(name)
        loaded = time.perf_counter() - start
        top = next_token_top_k(model, tokenizer, args.prompt, k=args.k, chat=not args.plain)
        print(f"{name} (loaded in {loaded:.1f} s; {'plain' if args.plain else 'chat'} prompt)")
        for token_id, text, prob in top:
            print(f"  {prob:7.4f}  {token_id:>7d}  {text!r}")
        del model
    return 0


def add_cli(sub) -> None:
    """`first assets peek NAME...`, under the `assets` command that `first_lib.assets` made."""
    p = sub.choices["assets"].actions.add_parser(
        "peek", help="top-k next tokens of a prompt, per model"
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="source name, local path or hub id")
    p.add_argument(
        "--prompt", default="Which city is farther north, Oslo or Helsinki?", help="user text"
    )
    p.add_argument("-k", type=int, default=5, help="how many tokens to show")
    p.add_argument("--plain", action="store_true", help="no chat template")
    p.set_defaults(func=_cmd_peek)
