"""How much arithmetic a stage does, and how fast this machine can do it.

Three things, torch-free except where a peak is measured:

- `Shape`: the few numbers of a decoder-only transformer that its cost depends on, read from a
  `transformers` config, a shipped config (`first_lib/configs/<asset>.json`) or a tiny profile
  size, without loading any weights (so `--dry-run` can price a run on a fresh machine).
- FLOP counts per stage: `forward_flops` (extraction, evaluation) and `train_flops`. These are
  *model* FLOPs in the PaLM convention (Chowdhery et al., 2022, app. B): 2 per multiply-add
  of every weight matrix a token passes through, plus the attention scores and mixing, not
  counting recomputation or padding. Padding tokens are computed but are not useful work, so
  they count in `pad_fraction`, never in the FLOPs.
- `peak_gflops`: the machine's measured dense-matmul rate at a precision (a square matmul timed
  for about a second, at the threads torch uses), cached per machine in
  `$FIRST_HOME/machine/`. `mfu` = achieved model FLOPs per second / that peak.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from first_lib import fsio
from first_lib.errors import FirstError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's cost-relevant sizes."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices: q, o (h x h), k, v (h x kv*hd), gate/up/down."""
        kv = self.kv_heads * self.head_dim
        return (
            2 * self.hidden * self.hidden
            + 2 * self.hidden * kv
            + 3 * self.hidden * self.intermediate
        )

    def to_dict(self) -> dict:
        return asdict(self)


def shape_of_config(cfg) -> Shape:
    """From a `transformers` config object or a config.json dict."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    heads = get("num_attention_heads")
    return Shape(
        layers=int(get("num_hidden_layers")),
        hidden=int(get("hidden_size")),
        intermediate=int(get("intermediate_size")),
        heads=int(heads),
        kv_heads=int(get("num_key_value_heads") or heads),
        vocab=int(get("vocab_size")),
    )


def shape_of(source: str) -> Shape | None:
    """The shape of a profile's model source without loading it: a shipped config for the asset
    names, the tiny sizes for ``tiny:*``, a local folder's config.json; None when unknown (a hub
    id on a machine without it)."""
    if source.startswith("tiny:"):
        from first_lib.models import _TINY_SIZES

        hidden, inter, layers, heads, kv = _TINY_SIZES[source.split(":", 1)[1]]
        return Shape(layers, hidden, inter, heads, kv, vocab=TINY_VOCAB)
    for path in (CONFIG_DIR / f"{source}.json", Path(source).expanduser() / "config.json"):
        if path.is_file():
            return shape_of_config(json.loads(path.read_text()))
    return None


TINY_VOCAB = 1024  # the tiny profile's tokenizer size, order of magnitude (its cost is tiny)


# ----------------------------------------------------------------------------- FLOP counts


def forward_flops(shape: Shape, tokens: int, seq_len: float, head_rows: int, layers=None) -> float:
    """Model FLOPs of a forward pass over `tokens` real tokens in sequences of mean length
    `seq_len`, through `layers` decoder layers (default all), with the LM head computed at
    `head_rows` positions (1 per sequence for multiple choice, every stored position in
    extraction)."""
    n = shape.layers if layers is None else layers
    # Attention: q.k scores and the weighted sum of v, each 2 * seq_len * hidden per token and
    # layer (the PaLM count, which does not halve for the causal mask).
    per_token = n * (2 * shape.layer_params + 4 * seq_len * shape.hidden)
    return tokens * per_token + head_rows * 2 * shape.hidden * shape.vocab


def train_flops(
    shape: Shape,
    tokens: int,
    seq_len: float,
    head_rows: int,
    trained_layers: int,
    lora: bool,
    forward_layers=None,
) -> float:
    """Model FLOPs of training steps over `tokens` tokens: the forward (through `forward_layers`,
    default all; fewer when the frozen bottom's states are cached), then the backward through the
    top `trained_layers` and the LM head. The backward computes the gradient with respect to each
    layer's input (1x the forward) and, for weights that train, with respect to them (another
    1x); LoRA's weights are frozen, so its backward is ~1x (the adapters' own products are a
    rank-r sliver and are not counted)."""
    fwd_layers = shape.layers if forward_layers is None else forward_layers
    fwd = forward_flops(shape, tokens, seq_len, head_rows, layers=fwd_layers)
    top = forward_flops(shape, tokens, seq_len, head_rows, layers=trained_layers)
    return fwd + top * (1 if lora else 2)


def pad_fraction(real_tokens: int, computed_tokens: int) -> float:
    """Share of the computed positions that were padding."""
    return 0.0 if computed_tokens <= 0 else 1.0 - real_tokens / computed_tokens


# ----------------------------------------------------------------------------- the peak


def _fingerprint(precision: str, device: str, threads: int) -> dict:
    import torch

    from first_lib import device as device_mod

    if device == "cuda":
        hw = torch.cuda.get_device_name(0)
    else:
        hw = device_mod.cpu_model() or platform.processor()
    return {
        "hardware": hw,
        "device": device,
        "precision": precision,
        "threads": threads,
        "torch": torch.__version__,
        "method": PEAK_METHOD,
        "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", "")
        + "/"
        + os.environ.get("ATEN_CPU_CAPABILITY", ""),
    }


# How `measure_peak_gflops` measures (part of the cached peak's key: a change re-measures).
# "uncontended": since a peak measured while other processes kept the cores busy is no longer
# cached, the peaks cached before (some measured beside a running stage) are measured again.
PEAK_METHOD = "square matmul, best of a @ b and F.linear(a, b); uncontended"


def measure_peak_gflops(precision: str, device: str = "cpu", seconds: float = 0.5) -> float:
    """The best rate of a square matmul at `precision` on `device`, timed for ~`seconds` in each
    of two layouts: n = 1024 on CPU (large enough to be compute-bound on a few cores), 8192 on a
    GPU. Both `a @ b` and `F.linear(a, b)` (= a @ b.T, the layout of every `nn.Linear`) are
    timed and the faster counts: on a CPU without native bf16 (AVX2 only) torch's bf16 `a @ b`
    falls back to a kernel ~10x slower than the one `nn.Linear` gets, which would make a model's
    utilisation look several times above the peak."""
    import torch

    from first_lib.device import torch_dtype

    dtype = torch_dtype(precision)
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def rate(op) -> float:
        def once() -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            op()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        once()  # warm-up: first call pays for kernel selection
        best, spent = float("inf"), 0.0
        while spent < seconds / 2 or best == float("inf"):
            dt = once()
            best, spent = min(best, dt), spent + dt
        return 2 * n**3 / best / 1e9

    with torch.no_grad():
        return max(rate(lambda: a @ b), rate(lambda: torch.nn.functional.linear(a, b)))


# Peaks measured while other processes were busy: kept for this process only (see peak_gflops).
_CONTENDED_PEAKS: dict[str, float] = {}


def peak_gflops(precision: str, device: str = "cpu", remeasure: bool = False) -> float:
    """This machine's matmul peak at `precision`, measured once and cached under
    `$FIRST_HOME/machine/` (keyed by hardware, precision, torch threads, torch version and any
    ISA cap in the environment).

    A CPU peak measured while other processes kept more than `CONTENDED_CORES` cores busy
    (`Contention`) is not cached: it measures the neighbours as much as the machine (beside one
    busy process, a 2-core EPYC's fp32 peak read 67 GFLOP/s against 184 alone), and a low peak
    cached for good would lengthen every estimate of the clock and inflate every `mfu`. This
    process uses it, with a warning, and the next process measures again."""
    import torch

    from first_lib.paths import first_home

    if precision not in ("fp32", "bf16"):
        raise FirstError(f"peak_gflops needs a resolved precision (fp32|bf16), got {precision!r}")
    fp = _fingerprint(precision, device, torch.get_num_threads())
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    name = f"peak-{digest}.json"
    path = first_home() / "machine" / name
    if not remeasure and path.is_file():
        try:
            return float(json.loads(path.read_text())["gflops"])
        except (ValueError, KeyError, OSError):
            pass  # damaged: measure again
    if not remeasure and str(path) in _CONTENDED_PEAKS:  # keyed like the cache it stands for
        return _CONTENDED_PEAKS[str(path)]
    contention = Contention()
    gflops = measure_peak_gflops(precision, device)
    wall = time.perf_counter() - contention.t0
    # /proc/stat counts in 10 ms ticks: below ~0.2 s of wall its share of a core is noise
    other = contention.other_cores() if device == "cpu" and wall >= 0.2 else None
    if other is not None and other > CONTENDED_CORES:
        import warnings

        _CONTENDED_PEAKS[str(path)] = gflops
        warnings.warn(
            f"the {precision} matmul peak ({gflops:.0f} GFLOP/s) was measured while other "
            f"processes kept {other:.1f} cores busy: used by this process only, not cached",
            stacklevel=2,
        )
        return gflops
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**fp, "gflops": gflops, "other_cores": other}
    fsio.atomic_write_text(path, json.dumps(record, indent=1))
    return gflops


def perf_record(
    flops: float,
    seconds: float,
    real_tokens: int,
    computed_tokens: int,
    precision: str,
    device: str = "cpu",
) -> dict:
    """What a stage writes under `perf` in its meta.json: model FLOPs, their rate, the ratio to
    the machine's peak at the stage's precision (`mfu`) and the padding share. Rate and mfu are
    None when no time was measured (a resumed stage whose work was all done before)."""
    peak = peak_gflops(precision, device)
    rate = flops / seconds / 1e9 if seconds > 0 else None
    from first_lib import device as device_mod

    return {
        "hardware": device_mod.cpu_model()
        if device == "cpu"
        else _fingerprint(precision, device, 0)["hardware"],
        "model_gflop": round(flops / 1e9, 3),
        "seconds": round(seconds, 3),
        "gflops": None if rate is None else round(rate, 2),
        "peak_gflops": round(peak, 1),
        # three significant digits: a tiny model's share of an AMX peak is ~1e-5, not 0
        "mfu": float(f"{rate / peak:.3g}") if rate is not None and peak > 0 else None,
        "real_tokens": int(real_tokens),
        "computed_tokens": int(computed_tokens),
        "pad_fraction": round(pad_fraction(real_tokens, computed_tokens), 4),
        "precision": precision,
        "device": device,
    }


# ----------------------------------------------------------------------------- a stage's tally


def attention_length(lengths) -> float:
    """The `seq_len` that makes `forward_flops` exact for a batch of sequences of `lengths` real
    tokens: a token of a sequence of length n attends over n positions, so the attention FLOPs are
    proportional to sum(n^2) = sum(n) * (sum(n^2) / sum(n))."""
    total = sum(lengths)
    return sum(n * n for n in lengths) / total if total else 0.0


# A stage shared the machine when other processes kept more than this many cores busy on average
# while it ran (a quarter of a core: background daemons use a few hundredths). Its `mfu` then
# measures the machine as it was, not the code: the clock leaves such records out of its rates.
CONTENDED_CORES = 0.25


def machine_busy_seconds() -> float | None:
    """CPU seconds every process on this machine has spent busy since boot (the first line of
    Linux's /proc/stat: user, nice, system, irq, softirq and steal time), None where there is no
    /proc/stat."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    t = os.times()
    return t.user + t.system


class Contention:
    """How busy the rest of the machine kept the CPU while a stage ran: the average number of cores
    that other processes used between construction and `other_cores()` (None where unmeasurable)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_seconds()
        self.own0 = own_cpu_seconds()

    def other_cores(self) -> float | None:
        busy, wall = machine_busy_seconds(), time.perf_counter() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        others = (busy - self.busy0) - (own_cpu_seconds() - self.own0)
        return round(max(others, 0.0) / wall, 3)


def contended(perf: dict) -> bool:
    """Whether a stage's `perf` record says it shared the machine (see `CONTENDED_CORES`); a
    record made before this was measured counts as not contended."""
    other = perf.get("other_cores")
    return other is not None and other > CONTENDED_CORES


class PeakMemory:
    """The most memory one stage held: on CPU the process's peak resident set (Linux's VmHWM,
    whose count this resets at construction by writing 5 to /proc/self/clear_refs), on a GPU
    torch's peak allocation on the current device since construction. A stage's weights, loaded
    before its tally starts, stay resident and so count; the transient copies of loading do not.
    `gb()` is None where the system does not say (no /proc, or a kernel that refuses the reset)."""

    def __init__(self):
        self.cpu_ok = _reset_hwm()
        self.cuda = False
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
                self.cuda = True
        except Exception:  # noqa: BLE001 - no torch, or no CUDA context: CPU only
            pass

    def gb(self, device: str = "cpu") -> float | None:
        if device != "cpu":
            if not self.cuda:
                return None
            import torch

            return round(torch.cuda.max_memory_allocated() / 1e9, 3)
        if not self.cpu_ok:
            return None
        kb = _status_kb("VmHWM")
        return None if kb is None else round(kb / 1e6, 3)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's peak resident set to its current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


class Tally:
    """Running totals of one stage's model work, batch by batch: model FLOPs, real and computed
    (padded) tokens, and the seconds of model work that the caller times with `clock`.

    `forward` and `train` take a batch's real lengths, its computed positions (batch x padded
    length) and the rows where the LM head runs; `record` turns the totals into `perf_record`,
    with the cores other processes kept busy since the tally was made (`Contention`) and the
    stage's peak memory (`PeakMemory`, GB).
    """

    def __init__(self, shape: Shape):
        self.shape = shape
        self.flops = 0.0
        self.real_tokens = 0
        self.computed_tokens = 0
        self.seconds = 0.0
        self.contention = Contention()
        self.memory = PeakMemory()

    def _tokens(self, lengths, computed: int) -> tuple[int, float]:
        real = int(sum(lengths))
        self.real_tokens += real
        self.computed_tokens += int(computed)
        return real, attention_length(lengths)

    def forward(self, lengths, computed: int, head_rows: int, layers=None) -> None:
        """A forward pass (extraction, evaluation) over one batch; `layers`: the decoder layers
        it ran (None: all; fewer when a cached frozen prefix skips the bottom ones)."""
        real, seq = self._tokens(lengths, computed)
        self.flops += forward_flops(self.shape, real, seq, head_rows, layers=layers)

    def train(
        self, lengths, computed: int, head_rows: int, trained_layers: int, lora: bool, **kw
    ) -> None:
        """A training micro-batch (forward and backward); `forward_layers=` as in `train_flops`."""
        real, seq = self._tokens(lengths, computed)
        self.flops += train_flops(self.shape, real, seq, head_rows, trained_layers, lora, **kw)

    @contextmanager
    def clock(self, device: str = "cpu"):
        """Add the wall time of the enclosed model work to `seconds` (on CUDA, synchronised at
        both ends so the queued kernels are counted)."""
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.seconds += time.perf_counter() - t0

    def record(self, precision: str, device: str = "cpu") -> dict:
        """The stage's `perf` dict (see `perf_record`), with the model's shape: a share of the
        peak is only a guide for models of the same size."""
        perf = perf_record(
            self.flops, self.seconds, self.real_tokens, self.computed_tokens, precision, device
        )
        # on a GPU the host's other work hardly bears on the rate (and other ranks are processes)
        other = self.contention.other_cores() if device == "cpu" else None
        peak = self.memory.gb(device)
        return {**perf, "shape": self.shape.to_dict(), "other_cores": other, "peak_memory_gb": peak}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
