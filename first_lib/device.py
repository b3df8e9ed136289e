"""The machine and the numbers it computes in: CPU features or GPU, the precision that `auto`
picks, and the process's one `accelerate` state. Every stage asks this module; nothing else
creates an `Accelerator` or decides a dtype.

Precision is a recorded choice. `requested_precision` reads it (an explicit value, else
`$FIRST_PRECISION`, else `auto`); `resolve_precision` turns `auto` into `fp32` or `bf16`:

- bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16 (native bf16 matrix
  products, several times faster than fp32 there);
- fp32 elsewhere: on an AVX2-only CPU bf16 products are emulated and about 20x slower.

The resolved value ("fp32" or "bf16", never "auto") goes into every artefact key, `meta.json`
and `results.json`, so runs at different precisions never share a cache entry.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

from first_lib.config import PRECISIONS, check_precision  # noqa: F401 - used by callers
from first_lib.errors import FirstError

ENV_VAR = "FIRST_PRECISION"

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which oneDNN has no native bf16 kernels: a user who
# caps the ISA this way gets the fp32 choice of an AVX2 machine from `auto`.
_ISA_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


# ----------------------------------------------------------------------------- hardware


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (Linux); empty where unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_bf16_features() -> dict[str, bool]:
    """Which native-bf16 features this CPU has, as torch sees them (cpuinfo), plus AVX2."""
    import torch

    def has(name: str) -> bool:
        fn = getattr(torch.cpu, name, None)
        return bool(fn()) if fn is not None else False

    flags = cpu_flags()
    return {
        "avx2": "avx2" in flags or has("_is_avx2_supported"),
        "avx512_bf16": has("_is_avx512_bf16_supported") or "avx512_bf16" in flags,
        "amx_bf16": has("_is_amx_tile_supported") or "amx_bf16" in flags,
    }


def _onednn_cap_blocks_bf16() -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return cap in _ISA_WITHOUT_BF16


def bf16_is_fast(device=None) -> bool:
    """Whether bf16 runs natively on `device` (default: the one `default_device` picks): CUDA
    with bf16 support, or a CPU with AVX512-BF16 or AMX whose oneDNN ISA is not capped below it."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        feats = cpu_bf16_features()
        return (feats["avx512_bf16"] or feats["amx_bf16"]) and not _onednn_cap_blocks_bf16()
    return False


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- precision


def requested_precision(value: str | None = None) -> str:
    """The precision asked for: `value` when given, else `$FIRST_PRECISION`, else "auto"."""
    if value is not None:
        return check_precision(str(value).strip().lower())
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return check_precision(env, where=f"${ENV_VAR}")
    return "auto"


def resolve_precision(value: str | None = None, device=None) -> str:
    """ "fp32" or "bf16": the requested precision with "auto" decided for `device`."""
    want = requested_precision(value)
    if want != "auto":
        return want
    return "bf16" if bf16_is_fast(device) else "fp32"


def torch_dtype(precision: str):
    """The dtype of model weights for inference and frozen LoRA bases at `precision`."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[check_precision(precision)]


def autocast(precision: str, device=None):
    """`torch.autocast` to bf16 when `precision` is bf16, a no-op context otherwise."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ----------------------------------------------------------------------------- accelerate


def accelerator(precision: str):
    """The process's `accelerate.Accelerator` at `precision` ("fp32" or "bf16").

    accelerate keeps one state per process and refuses a second `Accelerator` with another
    `mixed_precision`. Every stage, the benchmark and chapter kernels ask for theirs here: when
    the precision changes, the precision part of the state is reset (the process group and the
    device are kept) before a new `Accelerator` is made. Ask again at each stage; do not keep an
    `Accelerator` across calls that may run at another precision.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if precision not in ("fp32", "bf16"):
        raise FirstError(f"accelerator precision must be fp32 or bf16, got {precision!r}")
    want = "bf16" if precision == "bf16" else "no"
    shared = AcceleratorState._shared_state
    # DeepSpeed keeps its precision in its own config (accelerate records "no" and never refuses)
    deepspeed = str(shared.get("distributed_type", "")).endswith("DEEPSPEED")
    if shared and not deepspeed and shared.get("_mixed_precision") not in (None, want):
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
    cpu = not torch.cuda.is_available()  # on CPUs, several processes (gloo) need cpu=True
    return Accelerator(cpu=cpu, mixed_precision=want)


def accelerator_precision(acc) -> str:
    """The precision an `Accelerator` computes in ("bf16" or "fp32")."""
    return "bf16" if str(acc.mixed_precision) == "bf16" else "fp32"


# ----------------------------------------------------------------------------- first info


def info() -> dict:
    """What `first info` shows: the hardware, what `auto` picks, threads, versions, FIRST_HOME."""
    import torch

    from first_lib.paths import first_home

    out: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    out["cpu"] = {
        "model": cpu_model(),
        "cores": os.cpu_count(),
        **cpu_bf16_features(),
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
    }
    if torch.cuda.is_available():
        out["gpu"] = {
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "bf16": torch.cuda.is_bf16_supported(),
            "memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        }
    else:
        out["gpu"] = None
    device = default_device()
    out["device"] = str(device)
    out["precision"] = {
        "requested": requested_precision(),
        "env": os.environ.get(ENV_VAR) or None,
        "auto_picks": "bf16" if bf16_is_fast(device) else "fp32",
        "resolved": resolve_precision(),
    }
    out["threads"] = torch.get_num_threads()
    versions = {"torch": torch.__version__}
    for name in ("transformers", "accelerate", "peft", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    out["versions"] = versions
    home = first_home()
    out["first_home"] = str(home)
    out["first_home_exists"] = home.is_dir()
    return out


def describe_info(d: dict) -> str:
    cpu, prec = d["cpu"], d["precision"]
    yes = {True: "yes", False: "no"}
    lines = [
        f"cpu        {cpu['model']} ({cpu['cores']} cores; torch kernels: {cpu['torch_capability']})",
        f"           AVX2 {yes[cpu['avx2']]}, AVX512-BF16 {yes[cpu['avx512_bf16']]}, "
        f"AMX-BF16 {yes[cpu['amx_bf16']]}"
        + (
            f", ONEDNN_MAX_CPU_ISA={cpu['onednn_max_cpu_isa']}" if cpu["onednn_max_cpu_isa"] else ""
        ),
        "gpu        "
        + (
            f"{d['gpu']['count']} x {d['gpu']['name']} ({d['gpu']['memory_gb']} GB, "
            f"bf16 {yes[d['gpu']['bf16']]})"
            if d["gpu"]
            else "none"
        ),
        f"device     {d['device']}",
        f"precision  auto picks {prec['auto_picks']}; this process would run at "
        f"{prec['resolved']} (requested {prec['requested']}"
        + (f" by ${ENV_VAR}" if prec["env"] else "")
        + "; set --precision or $FIRST_PRECISION: auto | fp32 | bf16)",
        f"threads    {d['threads']}",
        "versions   " + ", ".join(f"{k} {v}" for k, v in d["versions"].items()),
        f"python     {d['python']} on {d['platform']}",
        f"FIRST_HOME {d['first_home']}" + ("" if d["first_home_exists"] else " (not created yet)"),
    ]
    return "\n".join(lines)


def _cmd_info(args) -> int:
    import json

    d = info()
    print(json.dumps(d, indent=2) if args.json else describe_info(d))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "info", help="this machine: CPU features or GPU, the precision auto picks, versions"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)


def add_precision_argument(p) -> None:
    """`--precision` for a command that computes (the same as $FIRST_PRECISION)."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="auto | fp32 | bf16 (default: $FIRST_PRECISION, else auto: bf16 on GPUs and on "
        "CPUs with AMX or AVX512-BF16, fp32 elsewhere)",
    )
