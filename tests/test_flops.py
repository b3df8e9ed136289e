"""The FLOP model and the machine's peak (first_lib/flops.py)."""

import json
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from first_lib import flops
from first_lib.models import make_tiny_model


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_shape_counts_every_weight_matrix_of_a_layer():
    model = make_tiny_model(1024, "teacher")
    shape = flops.shape_of_config(model.config)
    layer = model.model.layers[0]
    matrices = sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear))
    assert shape.layer_params == matrices
    assert flops.shape_of("tiny:teacher") == shape


def test_shipped_configs_give_the_real_sizes():
    s = flops.shape_of("qwen2.5-coder-0.5b-instruct")
    assert (s.layers, s.hidden, s.vocab) == (24, 896, 151936)
    assert 350e6 < s.layers * s.layer_params < 370e6  # 494M minus the 136M embedding
    assert flops.shape_of("no/such-model") is None


def test_forward_flops_match_torch_flop_counter():
    """torch counts every matmul (and the attention products) of a real forward; the model's
    count must agree to within the non-matmul rounding."""
    model = make_tiny_model(1024, "teacher").float()
    model.config._attn_implementation = "eager"
    B, T = 3, 40
    ids = torch.randint(0, 1024, (B, T))
    got = _counted(lambda: model(ids, logits_to_keep=1))
    want = flops.forward_flops(flops.shape_of_config(model.config), B * T, T, head_rows=B)
    assert abs(got - want) / want < 0.02, (got, want)


def test_train_flops_match_torch_flop_counter_for_full_training():
    model = make_tiny_model(1024, "student").float()
    model.config._attn_implementation = "eager"
    model.get_input_embeddings().weight.requires_grad_(False)
    B, T = 2, 32
    ids = torch.randint(0, 1024, (B, T))

    def step():
        model(ids).logits.sum().backward()

    got = _counted(step)
    shape = flops.shape_of_config(model.config)
    want = flops.train_flops(
        shape, B * T, T, head_rows=B * T, trained_layers=shape.layers, lora=False
    )
    # The first layer's input gradient is not needed (frozen embedding) but the count includes
    # it: a small overestimate, bounded here.
    assert 0.9 < want / got < 1.15, (got, want)


def test_pad_fraction():
    assert abs(flops.pad_fraction(90, 100) - 0.1) < 1e-12
    assert flops.pad_fraction(0, 0) == 0.0


def test_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    calls = []

    def fake(precision, device="cpu", seconds=1.0):
        calls.append(precision)
        return 123.0

    monkeypatch.setattr(flops, "measure_peak_gflops", fake)
    assert flops.peak_gflops("fp32") == 123.0
    assert flops.peak_gflops("fp32") == 123.0
    assert calls == ["fp32"]
    assert len(list((tmp_path / "machine").glob("peak-*.json"))) == 1
    rec = flops.perf_record(246e9, 2.0, 90, 100, "fp32")
    assert rec["mfu"] == 1.0 and abs(rec["pad_fraction"] - 0.1) < 1e-9


def test_a_peak_measured_beside_busy_processes_is_not_cached(tmp_path, monkeypatch):
    """A peak measured while other processes kept 1.5 cores busy is used by this process (with a
    warning) and not written to $FIRST_HOME; measured alone, it is cached with its other_cores."""
    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    monkeypatch.setattr(flops, "_CONTENDED_PEAKS", {})
    busy = {"cores": 1.5}
    monkeypatch.setattr(flops.Contention, "other_cores", lambda self: busy["cores"])
    calls = []

    def fake(precision, device="cpu", seconds=1.0):
        calls.append(precision)
        time.sleep(0.25)  # a measurement long enough for /proc/stat's ticks
        return 60.0 if busy["cores"] > 1 else 180.0

    monkeypatch.setattr(flops, "measure_peak_gflops", fake)
    with pytest.warns(UserWarning, match="1.5 cores busy"):
        assert flops.peak_gflops("fp32") == 60.0
    assert flops.peak_gflops("fp32") == 60.0 and calls == ["fp32"]  # once a process
    assert not list(tmp_path.glob("machine/peak-*.json"))
    monkeypatch.setattr(flops, "_CONTENDED_PEAKS", {})  # a new process, the machine now idle
    busy["cores"] = 0.02
    assert flops.peak_gflops("fp32") == 180.0
    (cached,) = tmp_path.glob("machine/peak-*.json")
    assert json.loads(cached.read_text())["other_cores"] == 0.02
    assert flops.peak_gflops("fp32") == 180.0 and calls == ["fp32", "fp32"]


def test_a_real_peak_is_positive_at_both_precisions():
    for precision in ("fp32", "bf16"):
        assert flops.measure_peak_gflops(precision, seconds=0.05) > 0


def test_contention_counts_other_processes_not_this_one(monkeypatch):
    """`Contention.other_cores`: the machine's busy CPU seconds less this process's, per second of
    wall time (the counters replaced by a script: 3 s of wall, 5 busy seconds of which 2 ours)."""
    clock = iter([100.0, 103.0])
    busy = iter([1000.0, 1005.0])
    own = iter([10.0, 12.0])
    monkeypatch.setattr(flops.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(flops, "machine_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(flops, "own_cpu_seconds", lambda: next(own))
    c = flops.Contention()
    assert c.other_cores() == pytest.approx(1.0)  # (5 - 2) / 3
    assert flops.contended({"other_cores": 1.0})
    assert not flops.contended({"other_cores": 0.05}) and not flops.contended({})


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux's /proc/stat")
def test_a_busy_neighbour_process_is_measured():
    """A real second process spinning on one core for a second shows as about one busy core."""
    import subprocess
    import sys

    c = flops.Contention()
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import time\nt = time.perf_counter()\nwhile time.perf_counter() - t < 1.0: pass",
        ],
        check=True,
    )
    other = c.other_cores()
    assert other is not None and other > 0.5


def test_an_evaluation_counts_the_bottom_states_it_built(tmp_path, monkeypatch):
    """An evaluation that builds the frozen bottom's cache entry spends that pass on its clock;
    `stages.count_prefix_builds` adds its FLOPs (torch's count of the same pass) and its padded
    positions, and leaves alone the entries that were there before the stage began."""
    from first_lib import prefix
    from first_lib.pipeline import stages

    monkeypatch.setenv("FIRST_HOME", str(tmp_path))
    model = make_tiny_model(1024, "teacher").float()
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(5, 30, (11,), generator=gen)]
    seqs = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in lengths]
    root = prefix.cache_root()
    old = prefix.cached_bottom_states(model, seqs[:4], 2, root=root)  # there before the stage
    assert len(old) == 4
    before = stages._prefix_entries()
    assert len(before) == 1
    got = _counted(lambda: prefix.cached_bottom_states(model, seqs, 2, root=root))
    tally = flops.Tally(flops.shape_of_config(model.config))
    assert stages.count_prefix_builds(tally, before) == 1
    assert tally.seconds == 0.0  # the time is the caller's clock's
    # torch counts the padded positions too; the model counts real tokens: compare each share
    order = sorted(lengths, reverse=True)
    batches = [order[i : i + prefix.BATCH_SIZE] for i in range(0, len(order), prefix.BATCH_SIZE)]
    computed = sum(len(b) * b[0] for b in batches)
    assert tally.real_tokens == sum(lengths) and tally.computed_tokens == computed
    shape = flops.shape_of_config(model.config)
    padded = sum(flops.forward_flops(shape, len(b) * b[0], b[0], 0, layers=2) for b in batches)
    assert abs(got - padded) / padded < 0.02, (got, padded)
    assert 0 < tally.flops < padded
    again = flops.Tally(shape)
    assert stages.count_prefix_builds(again, stages._prefix_entries()) == 0 and again.flops == 0


def test_a_stage_records_its_own_peak_memory():
    """`Tally.record` gives the stage's peak memory: what it held since the tally started (an
    array of 400 MB made and freed inside it counts), not what the process held before (a
    second tally started after the array was freed reports less)."""
    import numpy as np

    first = flops.Tally(flops.Shape(layers=1, hidden=8, intermediate=16, heads=2, kv_heads=2,
                                    vocab=32))  # fmt: skip
    block = np.ones(50_000_000)  # 400 MB, touched
    block.sum()
    del block
    peak = first.record("fp32")["peak_memory_gb"]
    if peak is None:
        pytest.skip("this system does not report a process's peak memory")
    second = flops.Tally(first.shape)
    after = second.record("fp32")["peak_memory_gb"]
    assert peak - after > 0.35, (peak, after)
    assert after > 0
