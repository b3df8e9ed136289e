"""Forward and backward time of one attention layer's maths on this CPU, by sequence length:
PyTorch's fused `sdpa` against plain matrix products (`first_lib.fastpath._short_or_sdpa`'s short
path), at the cpu profile's student shape (8 sequences, 14 query and 2 key-value heads of 64).
It chose `fastpath.SHORT_ATTENTION`.

    python -m scripts.attention_probe [--dtype bf16|fp32] [--lengths 60 128 192 254 384]
"""

from __future__ import annotations

import argparse
import time

import torch


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median forward and backward seconds of `fn()` (returns the output)."""
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        out.float().sum().backward()
        runs.append((t1 - t0, time.perf_counter() - t1))
    runs.sort(key=lambda r: r[0] + r[1])
    return runs[len(runs) // 2]


def main(argv=None) -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from first_lib import fastpath

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--lengths", type=int, nargs="+", default=[60, 128, 192, 254, 384])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    class Layer(torch.nn.Module):  # what the attention functions read off the module
        num_key_value_groups = 7
        is_causal = True

    layer = Layer()
    print(f"{'tokens':>6}  {'sdpa fwd+bwd ms':>15}  {'products fwd+bwd ms':>19}  ratio")
    for T in args.lengths:
        gen = torch.Generator().manual_seed(T)
        q, k, v = (
            torch.randn(8, h, T, 64, generator=gen).to(dtype).requires_grad_() for h in (14, 2, 2)
        )
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(8, 1, T, T)

        def sdpa(q=q, k=k, v=v, mask=mask):
            return sdpa_attention_forward(layer, q, k, v, mask, scaling=0.125)[0]

        def products(q=q, k=k, v=v, mask=mask):
            return fastpath._short_or_sdpa(layer, q, k, v, mask, scaling=0.125)[0]

        fused = _time(sdpa, args.repeats)
        saved = fastpath.SHORT_ATTENTION
        fastpath.SHORT_ATTENTION = 10**9  # the products path at every length
        try:
            plain = _time(products, args.repeats)
        finally:
            fastpath.SHORT_ATTENTION = saved
        a, b = sum(fused) * 1e3, sum(plain) * 1e3
        print(f"{T:>6}  {a:>15.1f}  {b:>19.1f}  {a / b:5.2f}")


if __name__ == "__main__":
    main()
