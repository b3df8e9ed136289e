"""`first bench` on the tiny configs: every measurement returns finite numbers under the right
keys, the disk-use numbers are the sizes of the files on disk, and the CLI writes its JSON.
About 40 s on two busy cores (the memory measurement starts two fresh Python processes)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from first_lib import bench, knowledge
from first_lib.errors import FirstError
from tests.conftest import PRECISIONS


@pytest.fixture(scope="module", params=PRECISIONS)
def results(request, tmp_path_factory):
    """The tiny bench at each precision, in one process (the accelerator state changes)."""
    cfg = bench.preset("tiny", precision=request.param)
    return bench.run_bench(cfg, work_dir=tmp_path_factory.mktemp(f"bench-{request.param}"))


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_target_metric_is_finite_and_checked(results):
    for key, (op, target) in bench.TARGETS.items():
        assert finite(results[key]) and results[key] > 0, key
        t = results["targets"][key]
        assert t["op"] == op and t["target"] == target and t["value"] == results[key]
        assert isinstance(t["holds"], bool)
    json.dumps(results, allow_nan=False)  # the JSON file is strict JSON


def test_ratios_are_sane(results):
    d = results["details"]
    assert 0.2 < results["kd_over_ce_step_time"] < 5
    assert 0.5 < results["kd_over_ce_peak_memory"] < 2
    assert d["peak_memory_bytes"]["ce"] > 10 * 2**20  # a Python process with torch
    assert 0 < results["extract_over_forward_throughput"] < 50
    # the second extraction measurement, with the preset's `extract_model` (any causal LM will do)
    real = d["extract_real"]
    assert real["model"] == bench.preset("tiny").extract_model == "tiny-student"
    assert (
        results["extract_over_forward_throughput_real"] == real["extract_over_forward_throughput"]
    )
    assert len(real["extract_over_forward_samples"]) == bench.preset("tiny").reps
    assert "extract_all_over_forward_throughput" not in real  # only forward and extract measured
    assert 0 < results["offline_over_online_step_time"] < 5
    assert set(d["offline_over_online_step_time_by_impl"]) == {"equivalent", "lean"}
    assert results["online_impl"] == "first_lib.bench.online_step_equivalent"
    for v in ("ce", "kd", "online:equivalent", "online:lean"):
        assert finite(d["step_seconds"][v]) and d["step_seconds"][v] > 0
        assert len(d["step_seconds_samples"][v]) == bench.preset("tiny").reps
    assert d["coefficient_search_positions"] == bench.preset("tiny").coef_positions
    # A 1,024-token vocabulary: 10-bit ids in uint16 (2 x 5 bytes) + 5 fp16 values = 20 bytes.
    assert results["store_bytes_per_token"] == knowledge.bytes_per_position(5, 1024) == 20


def test_prefix_reuse_keys_and_shape(results):
    """Frozen-prefix reuse at L = 8 (the targets) and L = 12 of 24 layers: finite speedups and
    build costs; no bound on the ratios, which tiny models on a busy machine do not make
    robust."""
    for key in (
        "prefix_reuse_train_speedup",
        "prefix_reuse_eval_speedup",
        "prefix_reuse_train_speedup_L12",
        "prefix_reuse_eval_speedup_L12",
    ):
        assert finite(results[key]) and results[key] > 0, key
    reuse = results["details"]["prefix_reuse"]
    assert reuse["layers"] == 24
    for top in bench.PREFIX_LAYERS:
        for what in ("train", "eval"):
            r = reuse[f"L{top}"][what]
            assert set(r) == {
                "speedup",
                "seconds_plain",
                "seconds_cached",
                "build_seconds",
                "build_in_plain_runs",
            }
            assert all(finite(v) for v in r.values())
            assert r["seconds_plain"] > 0 and r["seconds_cached"] > 0
    assert reuse["L8"]["train"]["speedup"] == results["prefix_reuse_train_speedup"]
    assert "prefix_reuse_eval_speedup_L12" in bench.format_table(results)


def test_machine_block_and_table(results):
    m = results["machine"]
    for key in ("cpu", "cores", "torch", "torch_threads", "gpu", "precision", "date"):
        assert key in m
    assert m["precision"] == results["precision"] == results["config"]["precision"]
    assert m["precision"] in PRECISIONS and m["device"] == "cpu"
    assert len(results["load_average"]["start"]) == 3
    table = bench.format_table(results)
    for key in bench.TARGETS:
        assert key in table
    assert "machine:" in table


def test_peaks_and_utilisation(results):
    """The matmul peak at both precisions, and each measured throughput as a share of the peak at
    the bench's precision (mfu)."""
    peaks = results["matmul_peak_gflops"]
    assert set(peaks) == {"fp32", "bf16"} and all(finite(g) and g > 0 for g in peaks.values())
    d = results["details"]
    for key in ("extract_mfu", "forward_mfu", "extract_all_mfu", "forward_full_mfu"):
        assert finite(d[key]) and 0 < d[key] < 1.5, key
    assert set(d["train_mfu"]) == {"ce", "kd"}
    assert all(finite(x) and 0 < x < 1.5 for x in d["train_mfu"].values())
    assert finite(d["extract_over_full_logits_forward_throughput"])
    assert "matmul_peak_gflops[bf16]" in bench.format_table(results)


def test_store_bytes_are_the_files_on_disk(tmp_path):
    cfg = bench.preset("tiny")
    teacher = bench.build_model(cfg.teacher, "cpu", torch.float32, seed=0).eval()
    vocab = teacher.get_input_embeddings().num_embeddings
    examples = bench.make_examples(3, 12, vocab, 0.5, seed=1)
    d = bench.measure_store_bytes(teacher, examples, cfg, tmp_path)

    n = sum(sum(ex["target_mask"]) for ex in examples)
    assert d["store_positions"] == n
    payload = sum(
        f.stat().st_size
        for f in (tmp_path / "bytes-store").rglob("*.bin")
        if f.name in ("ids_lo.bin", "ids_hi.bin", "values.bin")
    )
    assert d["store_payload_bytes"] == payload == n * knowledge.bytes_per_position(5, vocab)
    assert d["store_bytes_per_token"] == payload / n
    assert d["store_all_files_bytes"] == sum(
        f.stat().st_size for f in (tmp_path / "bytes-store").rglob("*") if f.is_file()
    )
    jsonl = tmp_path / "topk.jsonl"
    assert d["jsonl_bytes"] == jsonl.stat().st_size
    lines = jsonl.read_text().splitlines()
    assert len(lines) == n
    row = json.loads(lines[0])
    assert len(row["token_ids"]) == len(row["probs"]) == 5
    assert d["full_fp16_bytes"] == n * vocab * 2
    assert d["full_fp16_bytes_per_token"] == vocab * 2


def test_jsonl_layout_round_trips(tmp_path):
    ids = np.array([[5, 3, 9, 1, 0], [7, 2, 4, 8, 6]])
    probs = np.array([[0.5, 0.2, 0.1, 0.05, 0.05], [0.9, 0.04, 0.03, 0.02, 0.01]], np.float32)
    size = bench.write_jsonl_topk(tmp_path / "x.jsonl", ids, probs)
    rows = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert size == (tmp_path / "x.jsonl").stat().st_size
    assert [r["token_ids"] for r in rows] == ids.tolist()
    np.testing.assert_array_equal(np.array([r["probs"] for r in rows], np.float32), probs)


def test_check_targets_edges():
    vals = {k: None for k in bench.TARGETS}
    vals.update(
        store_bytes_per_token=22.0,  # "at most 22" holds at 22
        coefficient_search_seconds=1.0,  # "under 1 s" does not hold at 1
        kd_over_ce_step_time=float("nan"),
        extract_over_forward_throughput=0.9,
        prefix_reuse_train_speedup=1.8,  # "at least" holds at the target
        prefix_reuse_eval_speedup=1.99,
    )
    t = bench.check_targets(vals)
    assert t["store_bytes_per_token"]["holds"]
    assert not t["coefficient_search_seconds"]["holds"]
    assert not t["kd_over_ce_step_time"]["holds"]
    assert t["extract_over_forward_throughput"]["holds"]
    assert t["prefix_reuse_train_speedup"]["holds"]
    assert not t["prefix_reuse_eval_speedup"]["holds"]
    assert not t["offline_over_online_step_time"]["holds"]  # missing


def test_shipped_configs_are_the_real_architectures():
    s = bench.model_config("qwen2.5-coder-0.5b-instruct")
    t = bench.model_config("qwen2.5-coder-1.5b-instruct")
    assert s.vocab_size == t.vocab_size == 151_936
    assert (s.hidden_size, s.num_hidden_layers) == (896, 24)
    assert (t.hidden_size, t.num_hidden_layers) == (1536, 28)
    q = bench.model_config("quick-student")
    assert q.vocab_size == 151_936 and len(q.layer_types) == q.num_hidden_layers
    with torch.device("meta"):  # parameter counts without allocating anything
        from transformers import AutoModelForCausalLM

        sizes = {
            n: sum(
                p.numel()
                for p in AutoModelForCausalLM.from_config(bench.model_config(n)).parameters()
            )
            for n in ("quick-student", "quick-teacher")
        }
    assert 2.5 < sizes["quick-teacher"] / sizes["quick-student"] < 3.5  # the 3:1 of 1.5B:0.5B


def test_bad_settings_are_clear_errors():
    with pytest.raises(FirstError, match="no model config"):
        bench.model_config("no-such-model")
    with pytest.raises(FirstError, match="device"):
        bench.preset("tiny", device="tpu")
    with pytest.raises(FirstError, match="online"):
        bench.preset("tiny", online=("gkd",))
    with pytest.raises(FirstError, match="preset"):
        bench.preset("huge")


def test_chapter_timings_read_when_present(tmp_path):
    assert bench.chapter_timings("cpu", root=tmp_path)["chapter_seconds"] is None
    folder = tmp_path / "_build" / "results" / "cpu"
    folder.mkdir(parents=True)
    runs = [{"seconds": 80.0, "forced": False}, {"seconds": 9.5, "forced": True}]
    (folder / "timings.json").write_text(
        json.dumps({"intro": {"executions": runs}, "ls_vs_ts": {"executions": runs[:1]}})
    )
    got = bench.chapter_timings("cpu", root=tmp_path)["chapter_seconds"]
    assert got["intro"] == {"cold": 80.0, "cached": 9.5, "executions": 2}
    assert got["ls_vs_ts"] == {"cold": 80.0, "cached": None, "executions": 1}
    assert bench.summarize_timings({"intro": 12.5}) == {
        "intro": {"cold": 12.5, "cached": None, "executions": 1}
    }


def test_cli_writes_results(tmp_path, capsys, precision):
    from first_lib.cli import main

    out, js = tmp_path / "r.json", tmp_path / "copy.json"
    argv = ["bench", "--tiny", "--no-memory", "--out", str(out), "--json", str(js)]
    rc = main([*argv, "--precision", precision])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kd_over_ce_step_time" in printed and str(out) in printed
    data = json.loads(out.read_text())
    assert data == json.loads(js.read_text())
    assert data["kd_over_ce_peak_memory"] is None  # --no-memory
    assert data["config"]["preset"] == "tiny"
    assert data["precision"] == data["config"]["precision"] == precision


def test_cli_json_alone_on_stdout(tmp_path, capsys, monkeypatch):
    """`first bench --json` without a path: stdout is the JSON alone (pipe it to jq); the
    table goes to stderr. FIRST_PRECISION chooses the precision like --precision."""
    from first_lib.cli import main

    monkeypatch.setenv("FIRST_PRECISION", "fp32")
    out = tmp_path / "r.json"
    assert main(["bench", "--tiny", "--no-memory", "--reps", "1", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["precision"] == "fp32" and "kd_over_ce_step_time" in captured.err
