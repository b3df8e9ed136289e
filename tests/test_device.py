"""Precision as a recorded choice, and one accelerator state per process (TINY RANDOM MODELS where
a model is needed: machinery only)."""

from __future__ import annotations

import json

import pytest
import torch

from first_lib import device, models, pipeline, train
from first_lib.errors import FirstError
from first_lib.paths import first_home
from first_lib.profiles import get_profile
from tests.conftest import isolated_home

HOSTS = {
    "avx2-only": {"avx2": True, "avx512_bf16": False, "amx_bf16": False},
    "avx512-bf16": {"avx2": True, "avx512_bf16": True, "amx_bf16": False},
    "amx": {"avx2": True, "avx512_bf16": True, "amx_bf16": True},
}


def test_requested_precision_order(monkeypatch):
    monkeypatch.delenv("FIRST_PRECISION", raising=False)
    assert device.requested_precision() == "auto"
    monkeypatch.setenv("FIRST_PRECISION", "BF16")
    assert device.requested_precision() == "bf16"
    assert device.requested_precision("fp32") == "fp32"  # an explicit value beats the env
    assert device.resolve_precision("fp32") == "fp32" and device.resolve_precision() == "bf16"
    monkeypatch.setenv("FIRST_PRECISION", "fp16")
    with pytest.raises(FirstError, match=r"\$FIRST_PRECISION = 'fp16'"):
        device.resolve_precision()
    with pytest.raises(FirstError, match="choose one of auto, fp32, bf16"):
        device.resolve_precision("int8")


@pytest.mark.parametrize("host", HOSTS)
def test_auto_follows_the_hardware(monkeypatch, host):
    """auto: bf16 on CPUs with AVX512-BF16 or AMX, fp32 on AVX2-only CPUs and when oneDNN's ISA
    is capped below bf16."""
    monkeypatch.delenv("FIRST_PRECISION", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(device, "cpu_bf16_features", lambda: dict(HOSTS[host]))
    cpu = torch.device("cpu")
    expected = "fp32" if host == "avx2-only" else "bf16"
    assert device.resolve_precision(None, cpu) == expected
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert device.resolve_precision(None, cpu) == "fp32"
    monkeypatch.setenv("FIRST_PRECISION", "bf16")  # forced: emulated on AVX2, but allowed
    assert device.resolve_precision(None, cpu) == "bf16"


def test_plan_keys_differ_by_precision():
    prof = get_profile("tiny")
    a = pipeline.plan(prof, "csqa", "fp32")
    b = pipeline.plan(prof, "csqa", "bf16")
    for x, y in zip(a, b, strict=True):
        dx = pipeline.artefact_dir(x["stage"], x["key"])
        dy = pipeline.artefact_dir(y["stage"], y["key"])
        assert dx != dy, x["stage"]
    assert pipeline.eval_key(prof, "csqa", "m", "fp32") != pipeline.eval_key(
        prof, "csqa", "m", "bf16"
    )


def test_precision_flag_beats_the_environment(capsys, monkeypatch):
    from first_lib.cli import main

    monkeypatch.setenv("FIRST_PRECISION", "bf16")
    assert main(["run", "--profile", "tiny", "--dry-run", "--precision", "fp32"]) == 0
    assert "precision fp32\n" in capsys.readouterr().out
    assert main(["run", "--profile", "tiny", "--dry-run"]) == 0
    assert "precision bf16\n" in capsys.readouterr().out
    assert main(["run", "--profile", "tiny", "--dry-run", "--set", "precision=fp32"]) == 0
    assert "precision fp32\n" in capsys.readouterr().out


def test_accelerator_changes_precision_in_one_process():
    """accelerate refuses a second Accelerator with another mixed_precision; `device.accelerator`
    resets the precision part of its state, so stages can alternate precisions."""
    for precision in ("bf16", "fp32", "bf16", "fp32"):
        acc = device.accelerator(precision)
        assert device.accelerator_precision(acc) == precision
    with pytest.raises(FirstError):
        device.accelerator("auto")


def _examples(n=8):
    return [
        {"id": f"x{i}", "input_ids": [2 + (i + t) % 50 for t in range(8)], "target_mask": [1] * 8}
        for i in range(n)
    ]


def test_training_at_both_precisions_in_one_process():
    """The training loop at bf16, then fp32, then bf16 again in one process: each run computes
    at its own precision (the frozen LoRA base is stored in that dtype)."""
    cfg = train.TrainConfig(lr=1e-3, epochs=1, batch_size=4, lora_r=2, lora_targets=("q_proj",))
    seen = {}
    for precision in ("bf16", "fp32", "bf16"):
        model = models.make_tiny_model(64, "student")
        acc = device.accelerator(precision)
        _, log = train.train(model, _examples(), cfg, pad_id=0, accelerator=acc, progress=False)
        assert log["precision"] == precision
        seen.setdefault(precision, []).append(log["losses"])
    assert seen["bf16"][0] == seen["bf16"][1]  # the same run twice: the same numbers
    assert seen["fp32"][0] != seen["bf16"][0]  # and bf16 rounding shows


def test_pipeline_stages_at_two_precisions_in_one_process(tmp_path, monkeypatch):
    """Two pipeline stages (tiny teacher fine-tune) at fp32 and at bf16 in one process: two
    artefacts, each recording its precision, and no accelerate error."""
    monkeypatch.setenv("FIRST_HOME", str(isolated_home(tmp_path)))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    threads = torch.get_num_threads()
    dirs = {}
    try:
        for precision in ("fp32", "bf16"):
            pipeline.run("tiny", "csqa", until="teacher", log=lambda m: None, precision=precision)
            prof = get_profile("tiny", precision=precision)
            step = pipeline.plan(prof, "csqa")[0]
            dirs[precision] = pipeline.artefact_dir(step["stage"], step["key"])
    finally:
        torch.set_num_threads(threads)
    assert dirs["fp32"] != dirs["bf16"]
    for precision, path in dirs.items():
        meta = json.loads((path / "meta.json").read_text())
        assert meta["precision"] == precision and meta["key"]["precision"] == precision


def test_first_info(capsys):
    from first_lib.cli import main

    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["precision"]["auto_picks"] in ("fp32", "bf16")
    assert d["precision"]["resolved"] == device.resolve_precision()
    assert set(d["cpu"]) >= {"avx2", "avx512_bf16", "amx_bf16", "model", "cores"}
    assert d["versions"]["torch"] == torch.__version__
    assert d["first_home"] == str(first_home()) and d["threads"] >= 1
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "auto picks" in text and "FIRST_HOME" in text
