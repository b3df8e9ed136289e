"""Frozen-prefix reuse: compute the frozen bottom of a decoder once, run only its top afterwards.

With LoRA on the top L of a model's N decoder layers (`TrainConfig.lora_layers`), the bottom
N - L layers and the embedding never change during training, so the hidden states they produce
for an example (the input of layer N - L) are the same in every epoch, seed and variant. The
same holds in evaluation: merging LoRA into the top layers leaves the bottom ones as they were,
so the untuned model and every tuned variant of it share one bottom. This module

- computes those *bottom states* for a list of token-id lists (`bottom_states`: batched with
  padding, returned per example without it);
- runs the top layers, the final norm and, where needed, the LM head from given bottom states
  (`top_hidden`, `last_token_logprobs`), the way `transformers`' `Qwen2Model.forward` runs its
  layers (rotary position embeddings, `create_causal_mask`, the layer call), so a PEFT-wrapped
  model gets gradients in its adapters and a plain merged model evaluates;
- caches bottom states on disk under ``$FIRST_HOME/prefix/<key hash>/`` (`cached_bottom_states`)
  so that other stages and processes reuse them. The key (`cache_key`) covers what the states
  depend on: the bottom weights by content (bottom layers and the embedding rows of the tokens
  used, as loaded), the precision, the device type, the layer split, the attention settings,
  the token ids and this module's code.

Where L = N (or full fine-tuning) nothing is cached: `n_frozen` returns 0 and the callers take
the ordinary path.

Equivalence: the cached path computes the same operations as the plain forward pass; the only
differences are those of batch composition (an example's bottom is computed next to other
examples than in the plain pass), i.e. rounding. `tests/test_prefix.py` measures them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from first_lib import artefacts, fsio

STATES_FILE = "states.safetensors"
# Examples per batch when bottom states are computed: one fixed size, so that an entry's values
# are a function of its key alone (other batch sizes round differently), whichever stage made it.
BATCH_SIZE = 8

# the name `first_lib.fastpath.use_training_attention` registers its attention under
TRAINING_ATTENTION = "first_cpu_train"


# ----------------------------------------------------------------------------- the model's parts


def causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM inside `model` (a PEFT wrapper's base model, or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`Qwen2Model`: embedding, layers, final norm, rotary embedding)."""
    return causal_lm(model).get_decoder()


def n_frozen(model: nn.Module, top_layers: int) -> int:
    """How many bottom layers to cache when only the top `top_layers` change: N - L for
    0 < L < N; 0 (the ordinary path) when L is 0 (all layers) or >= N."""
    if top_layers <= 0:
        return 0
    n = causal_lm(model).config.num_hidden_layers
    return n - top_layers if top_layers < n else 0


# ----------------------------------------------------------------------------- running layers


def _masks(dec: nn.Module, hidden, attention_mask, position_ids) -> dict:
    """The attention mask of each layer type, as `Qwen2Model.forward` builds them."""
    from transformers.masking_utils import (
        create_causal_mask,
        create_sliding_window_causal_mask,
    )

    kwargs = dict(
        config=dec.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        past_key_values=None,
        position_ids=position_ids,
    )
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if getattr(dec, "has_sliding_layers", False):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def run_layers(
    dec: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    layers: range,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoder layers `layers` of `dec` over `hidden` [B, T, H] with `attention_mask` [B, T];
    positions 0..T-1 unless `position_ids` [B, T] are given (left padding)."""
    if position_ids is None:
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    masks = _masks(dec, hidden, attention_mask, position_ids)
    position_embeddings = dec.rotary_emb(hidden, position_ids)
    for i in layers:
        hidden = dec.layers[i](
            hidden,
            attention_mask=masks[dec.config.layer_types[i]],
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
        )
    return hidden


def top_hidden(
    model: nn.Module,
    states: torch.Tensor,
    attention_mask: torch.Tensor,
    n_bottom: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The decoder's last hidden states [B, T, H] (after the final norm) from padded bottom
    states [B, T, H]: layers n_bottom..N-1 and the norm. Gradients reach any adapter in them."""
    dec = decoder(model)
    top = range(n_bottom, dec.config.num_hidden_layers)
    return dec.norm(run_layers(dec, states, attention_mask, top, position_ids))


def pad_states(
    states: Sequence[torch.Tensor], left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example states [n_i, H] -> padded [B, T, H] (zeros at padding; T the longest) and
    the attention mask [B, T] (int64), padded on the right (training) or on the left
    (evaluation)."""
    T = max(len(s) for s in states)
    first = states[0]
    out = first.new_zeros((len(states), T, first.shape[-1]))
    mask = torch.zeros((len(states), T), dtype=torch.long, device=first.device)
    for b, s in enumerate(states):
        rows = slice(T - len(s), T) if left else slice(0, len(s))
        out[b, rows] = s
        mask[b, rows] = 1
    return out, mask


def _pad_ids(seqs: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids [B, T] (padding id 0: masked out) and the attention mask."""
    T = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), T), dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def bottom_states(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    n_bottom: int,
    batch_size: int = BATCH_SIZE,
    autocast: bool = False,
) -> list[torch.Tensor]:
    """The output of decoder layer n_bottom - 1 (the input of layer n_bottom) for each token
    list in `seqs`: a list of [n_i, H] tensors in the model's compute dtype, on its device.
    Batched by length (longest first, right padding); `autocast`: bf16 autocast, as the
    training and evaluation passes run at bf16."""
    dec = decoder(model)
    device = dec.embed_tokens.weight.device
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            ids, mask = _pad_ids([seqs[i] for i in batch], device)
            hidden = run_layers(dec, dec.embed_tokens(ids), mask, range(n_bottom))
            for row, i in enumerate(batch):
                out[i] = hidden[row, : len(seqs[i])].clone()
    return out  # type: ignore[return-value]


def last_token_logprobs(
    model: nn.Module, states: Sequence[torch.Tensor], n_bottom: int, autocast: bool = False
) -> torch.Tensor:
    """Next-token log-probabilities [B, V] (float32) after each sequence, from its bottom
    states: left padding with explicit position ids, the LM head at the last position only
    (as `evaluate.last_token_logprobs` runs the whole model)."""
    padded, mask = pad_states(states, left=True)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast(padded.device.type, dtype=torch.bfloat16, enabled=autocast):
        hidden = top_hidden(model, padded, mask, n_bottom, position_ids)[:, -1]
        logits = causal_lm(model).get_output_embeddings()(hidden)
    return logits.float().log_softmax(dim=-1)


# ----------------------------------------------------------------------------- the cache key


def _hash_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
    h.update(t.view(-1).view(torch.uint8).numpy())


def bottom_weights_hash(
    model: nn.Module, n_bottom: int, token_ids: Sequence[int] | None = None
) -> str:
    """sha256 of the bottom layers' tensors and the embedding's (names, dtypes, shapes, bytes)
    as the model holds them: equal for every model whose bottom is bitwise the same. With
    `token_ids`, only those rows of the embedding: the bottom states of sequences made of these
    tokens depend on no other row, and the full 151,936-row matrix would cost more to hash than
    the bottom layers."""
    dec = decoder(model)
    h = hashlib.sha256()
    embedding = dec.embed_tokens.weight
    if token_ids is not None:
        rows = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        _hash_tensor(h, "embed_tokens.rows", rows)
        embedding = embedding[rows.to(embedding.device)]
    _hash_tensor(h, "embed_tokens.weight", embedding)
    for i in range(n_bottom):
        for name, t in sorted(dec.layers[i].state_dict().items()):
            _hash_tensor(h, f"layers.{i}.{name}", t)
    return h.hexdigest()


def tokens_hash(seqs: Sequence[Sequence[int]]) -> str:
    """sha256 of the token-id lists (order and lengths included)."""
    h = hashlib.sha256()
    for s in seqs:
        h.update(json.dumps(list(map(int, s))).encode() + b"\n")
    return h.hexdigest()


def _bottom_config(model: nn.Module, n_bottom: int) -> dict:
    """The config fields the bottom's computation depends on besides its weights."""
    cfg = causal_lm(model).config
    names = ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps")
    out = {name: getattr(cfg, name, None) for name in names}
    out["rope"] = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    # the training attention runs `sdpa` without gradients (`fastpath._short_or_sdpa`), and these
    # states are computed without: they are `sdpa`'s, shared with the untuned model's evaluation
    attention = cfg._attn_implementation
    out["attention"] = "sdpa" if attention == TRAINING_ATTENTION else attention
    out["layer_types"] = list(cfg.layer_types[:n_bottom])
    out["sliding_window"] = getattr(cfg, "sliding_window", None)
    return out


def cache_key(
    model: nn.Module, seqs: Sequence[Sequence[int]], n_bottom: int, autocast: bool
) -> dict:
    """What the bottom states of `seqs` depend on: the bottom weights (content hash of the
    bottom layers and of the embedding rows of the tokens in `seqs`), the precision (weight
    dtype and autocast), the device type, the split (N, N - L), the bottom's config, the token
    ids and this module's code. Not the top layers, the LM head or any adapter."""
    dec = decoder(model)
    used = {int(t) for seq in seqs for t in seq}
    return {
        "weights": bottom_weights_hash(model, n_bottom, used),
        "dtype": str(dec.embed_tokens.weight.dtype),
        "autocast_bf16": bool(autocast),
        "device": dec.embed_tokens.weight.device.type,
        "layers": [dec.config.num_hidden_layers, n_bottom],
        "config": _bottom_config(model, n_bottom),
        "tokens": tokens_hash(seqs),
        "n": len(seqs),
        "code": artefacts.code_version(["first_lib.prefix"]),
    }


# ----------------------------------------------------------------------------- the disk cache


def cache_root() -> Path:
    """Where bottom states are cached: ``$FIRST_HOME/prefix``."""
    from first_lib.paths import first_home

    return first_home() / "prefix"


def _save(folder: Path, key: dict, states: Sequence[torch.Tensor]) -> None:
    """Write an entry with the project's commit protocol: files into `<folder>.tmp`, fsynced,
    meta.json (the key and the files' sizes and sha256s) last, then the folder renamed."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lengths = torch.tensor([len(s) for s in states], dtype=torch.long)
    flat = torch.cat([s.to("cpu") for s in states]).contiguous()
    save_file({"states": flat, "lengths": lengths}, str(tmp / STATES_FILE))
    fsio.fsync_file(tmp / STATES_FILE)
    meta = {"key": key, "files": fsio.file_table(tmp)}
    fsio.atomic_write_json(tmp / "meta.json", meta, indent=2)
    fsio.fsync_dir(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    fsio.fsync_dir(folder.parent)


def _load(folder: Path, key: dict) -> tuple[list[torch.Tensor] | None, str | None]:
    """(states, None) from a finished entry of `key`, or (None, why not); every file's sha256 is
    checked against meta.json before it is read."""
    from safetensors.torch import load_file

    if not folder.exists():
        return None, "missing"
    if not artefacts.is_done(folder, key):
        return None, "meta.json is missing, corrupt, of another key or its files differ"
    table = artefacts.read_meta(folder)["files"]
    problem = fsio.table_problem(folder, table, hashes=True)
    if problem is not None:
        return None, problem
    try:
        data = load_file(str(folder / STATES_FILE))
        lengths = data["lengths"].tolist()
        states = list(torch.split(data["states"], lengths))
    except Exception as err:  # noqa: BLE001 - any damage the hashes did not catch
        return None, f"unreadable ({type(err).__name__})"
    if len(states) != key["n"]:
        return None, f"holds {len(states)} examples, the key says {key['n']}"
    return states, None


def cached_bottom_states(
    model: nn.Module,
    seqs: Sequence[Sequence[int]],
    n_bottom: int,
    autocast: bool = False,
    root: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> list[torch.Tensor]:
    """`bottom_states`, read from the disk cache under `root` when an entry of the same
    `cache_key` is there, else computed and written there (`root` None: computed, not
    cached). A damaged entry is reported through `log`, removed and recomputed. Processes
    asking for the same entry take turns (a lock file): the first computes, the others read."""
    if root is None:
        return bottom_states(model, seqs, n_bottom, autocast=autocast)
    key = cache_key(model, seqs, n_bottom, autocast)
    folder = Path(root) / artefacts.config_hash(key)
    device = decoder(model).embed_tokens.weight.device
    with fsio.file_lock(folder.with_name(folder.name + ".lock")):
        states, problem = _load(folder, key)
        if states is None:
            if problem != "missing" and log is not None:
                log(f"prefix cache {folder.name}: {problem}; recomputing")
            shutil.rmtree(folder, ignore_errors=True)
            states = bottom_states(model, seqs, n_bottom, autocast=autocast)
            _save(folder, key, states)
    return [s.to(device) for s in states]
