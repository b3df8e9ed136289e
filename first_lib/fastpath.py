"""Training's CPU fast paths: a LoRA linear as one `addmm`, short attention as matrix products.

Both compute what PEFT's and transformers' own forwards compute (tests/test_prefix.py holds them
to it at fp32 and bf16); they exist because elementwise passes and `sdpa`'s backward on short
sequences are what a 2-core CPU is slowest at. `first_lib.train.prepare_model` installs them.
"""

from __future__ import annotations

import torch
from torch import nn

from first_lib import prefix


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A plain LoRA linear: W x + s B (A x) with the scaling s and the sum inside one `addmm`."""
    name = self.active_adapters[0]
    base = self.base_layer
    if x.dtype != self.lora_A[name].weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return type(self).forward(self, x, *args, **kwargs)  # PEFT's, which casts the input
    out = nn.functional.linear(x, base.weight, base.bias)
    h = nn.functional.linear(x, self.lora_A[name].weight)
    rows = out.reshape(-1, out.shape[-1])
    rows = torch.addmm(
        rows, h.reshape(-1, h.shape[-1]), self.lora_B[name].weight.t(), alpha=self.scaling[name]
    )
    return rows.view(out.shape)


def _plain_lora(module: nn.Module) -> bool:
    """A PEFT LoRA linear with one adapter and nothing else: no dropout, bias or variant (DoRA)."""
    if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")):
        return False
    if not isinstance(module.base_layer, nn.Linear) or len(module.lora_A) != 1:
        return False
    (name,) = module.lora_A.keys()
    return (
        list(module.active_adapters) == [name]
        and isinstance(module.lora_dropout[name], nn.Identity)
        and module.lora_B[name].bias is None
        and not getattr(module, "lora_variant", {})
        and not getattr(module, "fan_in_fan_out", False)
        and not module.merged
    )


def fuse_lora(model: nn.Module) -> int:
    """Run every plain LoRA linear of `model` as the base product plus one `addmm`; returns how
    many. PEFT's own forward casts the layer's input to the adapters' dtype (a copy of every
    activation, cast back by autocast), then scales B(A x) and adds it to the base output: two
    more passes over an output as wide as 8960 values a token. Elementwise passes are what a
    2-core CPU is slowest at; on the cpu profile's models at bf16 this took a CSQA student's
    step of 8 questions from 1.74 s to 1.54 s and a BoolQ teacher's steps 1.25x faster. The
    maths is the same (B's product accumulates in fp32 before its one rounding); merging and
    checkpoints are PEFT's, untouched."""
    import types

    n = 0
    for module in model.modules():
        if _plain_lora(module):
            module.forward = types.MethodType(_fused_lora_forward, module)
            n += 1
    return n


# Attention for training on CPU. PyTorch's fused CPU attention (`sdpa`) has a slow backward on
# short sequences. Forward + backward of one layer's attention (8 sequences, 14 query heads of
# 64, a padding mask, bf16) took 13.0 ms with `sdpa` against 3.8 ms as plain matrix products at
# 60 tokens, 31 against 21 at 160; at 192 `sdpa` was faster (25 against 32), at 384 twice as
# fast, and it never builds the T x T scores. So up to `SHORT_ATTENTION` keys the products,
# beyond them `sdpa`. Measured on a 2-core Xeon with AMX (`python -m scripts.attention_probe`).
SHORT_ATTENTION = 160
ATTENTION = prefix.TRAINING_ATTENTION


def _short_or_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    """`sdpa` beyond `SHORT_ATTENTION` keys, without gradients (its forward is fast; so the
    frozen bottom states of `first_lib.prefix` are `sdpa`'s) or on any device but the CPU; else
    softmax(q k^T s + mask) v as matrix products, the softmax in fp32 as transformers' eager
    attention has it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    long = key.shape[2] > SHORT_ATTENTION or query.device.type != "cpu"
    if (
        long
        or not torch.is_grad_enabled()
        or dropout
        or kw.get("softcap") is not None
        or (attention_mask is None and kw.get("sliding_window") is not None)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw
        )
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is None:  # no padding: causal only
        T, S = query.shape[2], key.shape[2]
        attention_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril(S - T)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def use_training_attention(model: nn.Module) -> nn.Module:
    """Give `model` the training attention `_short_or_sdpa` (registered with `sdpa`'s masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, _short_or_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION)
    return model
