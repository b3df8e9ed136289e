"""The bench's inputs: random-weight models from shipped or derived configs, random examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from first_lib.errors import FirstError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Small configs derived from the real ones: the real 151,936-token vocabulary (the LM head is
# where top-k, CE and online KD differ), narrow and shallow bodies so a step takes a fraction of
# a second on two CPU cores. The teacher has ~3x the student's parameters, as 1.5B vs 0.5B.
_QWEN_05 = "qwen2.5-coder-0.5b-instruct"
_QWEN_15 = "qwen2.5-coder-1.5b-instruct"
_SMALL = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


def _small(base: str, vocab: int | None = None, **over: Any) -> tuple[str, dict[str, Any]]:
    spec = {**_SMALL, **over}
    if vocab is not None:  # special ids must lie inside a small vocabulary
        spec.update(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return base, spec


DERIVED: dict[str, tuple[str, dict[str, Any]]] = {
    "quick-student": _small(_QWEN_05, hidden_size=64, intermediate_size=192, num_hidden_layers=2),
    "quick-teacher": _small(
        _QWEN_15, hidden_size=192, intermediate_size=576, num_hidden_layers=2, num_attention_heads=6
    ),
    # For tests: a 1,024-token vocabulary, seconds for everything.
    "tiny-student": _small(
        _QWEN_05, 1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1
    ),
    "tiny-teacher": _small(
        _QWEN_15, 1024, hidden_size=96, intermediate_size=192, num_hidden_layers=1
    ),
    # Frozen-prefix reuse at reduced cost (`--prefix-model prefix-student`; the default is the
    # real 0.5B config): its 24 layers and vocabulary, 1/3.5 of its width (head size 64 and the
    # MLP's 5.4x expansion kept).
    "prefix-student": _small(_QWEN_05, hidden_size=256, intermediate_size=1408),
    "tiny-prefix-student": _small(_QWEN_05, 1024, hidden_size=32, intermediate_size=64),
}


def model_config(name: str):
    """A `transformers` config: a shipped one (``first_lib/configs/<name>.json``), a derived
    small one (`DERIVED`), or a path to any ``config.json``."""
    from transformers import AutoConfig

    if name in DERIVED:
        base, over = DERIVED[name]
        path = CONFIG_DIR / f"{base}.json"
    else:
        over = {}
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            path = Path(name).expanduser()
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise FirstError(
            f"no model config {name!r}: give one of {shipped + sorted(DERIVED)} or a path "
            "to a config.json"
        )
    spec = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    spec.update(over)
    if "layer_types" in spec:  # transformers 5 checks one entry per layer
        spec["layer_types"] = [spec["layer_types"][0]] * spec["num_hidden_layers"]
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def build_model(name: str, device: str, dtype, seed: int):
    """A randomly initialised causal LM of config `name`, created directly on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.config.name_or_path = f"random:{name}"
    return model


def make_examples(
    n: int, seq_len: int, vocab: int, target_frac: float, seed: int
) -> list[dict[str, Any]]:
    """n examples of `seq_len` random tokens; the last ``target_frac`` of the positions that
    predict a token (a response after a prompt) are targets."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n, seq_len))
    n_tgt = max(1, min(seq_len - 1, round(target_frac * (seq_len - 1))))
    mask = np.zeros(seq_len, dtype=bool)
    mask[seq_len - 1 - n_tgt : seq_len - 1] = True
    return [
        {"id": f"bench-{i:05d}", "input_ids": ids[i].tolist(), "target_mask": mask.tolist()}
        for i in range(n)
    ]


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())
