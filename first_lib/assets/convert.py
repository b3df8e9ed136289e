"""Dequantising a GGUF file into a plain `transformers` checkpoint (bf16 safetensors)."""

from __future__ import annotations

import copy
from pathlib import Path


def convert_gguf(gguf_file: Path, out_dir: Path) -> dict:
    """Dequantise a GGUF into a plain transformers checkpoint in `out_dir` (bf16 safetensors).

    Loading with `gguf_file=` keeps a GGUF quantizer on the model, which cannot be saved and
    which some trainers refuse; so a fresh model is built from the config without
    `quantization_config`, the dequantised weights are loaded into it (strict), and that is
    saved, with the tokenizer and its chat template. Returns facts for the manifest.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.initialization import no_init_weights

    gguf_file = Path(gguf_file)
    kwargs = {"gguf_file": gguf_file.name, "trust_remote_code": False}
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),  # plain layers, never packed blocks
        **kwargs,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with no_init_weights():  # every weight is overwritten below; skip the random init
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()  # no-op unless config.tie_word_embeddings
    if loaded.generation_config is not None:
        model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": int(config.vocab_size),
        "tokenizer_size": len(tokenizer),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "dtype": "bfloat16",
    }
