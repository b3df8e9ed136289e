"""`first run`: walk the stage graph (`first_lib.pipeline.graph`), compute every artefact that is
missing, and write `results.json` (with the whole resolved config) and `timings.json`."""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from first_lib import device, fsio
from first_lib.artefacts import UpstreamCorrupt, artefact_dir, read_meta, verify_upstream
from first_lib.config import Profile
from first_lib.errors import FirstError
from first_lib.pipeline import clock, memory, stages
from first_lib.pipeline.data import load_questions, test_tasks, tokenize
from first_lib.pipeline.graph import (
    BASELINES,
    POSTHOC,
    VARIANTS,
    Node,
    model_source,
    run_artefacts,
    run_precision,
    stage_graph,
)
from first_lib.pipeline.stale import in_use
from first_lib.profiles import for_setting, get_profile

UNTIL = ("teacher", "extract", "calibrate", "finetune", "distill")  # `first <stage>` stops there


def estimate_memory_gb(params_b: float, train: dict | None, precision: str = "bf16") -> float:
    """Peak memory of a stage where neither its model's shape nor its data is known here
    (`memory.fallback_gb`); `clock.estimate` gives each stage's `memory_gb` from both."""
    return memory.fallback_gb(params_b, train, precision)


def check_memory(needed: float, what: str, acc=None, advice=None) -> None:
    """One line, before anything is computed, when this machine cannot hold `needed` GB (the
    peak of the stage `what`); `advice(needed, have)`: what to change, as text."""
    if acc is not None and str(acc.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED"):
        needed /= acc.num_processes  # sharded weights, gradients and optimizer state
    elif acc is not None and acc.device.type == "cpu":
        needed *= acc.num_processes  # each process a replica, all in the host's memory
    have = available_memory_gb()
    if needed > have:
        how = advice(needed, have) if advice is not None else (
            "use --precision bf16 where the hardware has it, a smaller profile or a bigger machine"
        )  # fmt: skip
        raise FirstError(
            f"{what} needs about {needed:.0f} GB at its peak but this machine has {have:.0f} GB; "
            + how
        )


def available_memory_gb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[1] / 1e9
    except Exception:  # noqa: BLE001 - no torch or no CUDA: fall back to RAM
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def run(
    profile: str = "cpu",
    setting: str = "csqa",
    out: Path | None = None,
    until: str | None = None,
    log=None,
    **overrides,
) -> dict:
    """Run every missing stage of `profile` x `setting` and write `out/results.json`; the run's
    artefacts are registered as in use (`first clean` keeps them) while it runs."""
    prof = for_setting(get_profile(profile, **overrides), setting)
    with in_use(run_artefacts(prof, setting, run_precision(prof))):
        return _run(prof, setting, out, until, log)


PER_SEED = ("c_star", "delta", "calibration", "variants", "baselines", "by_test", "artefacts")
PER_SEED += ("held_out",)


def run_seeds(profile: str, setting: str, out: Path, seeds, log=None, **overrides) -> dict:
    """`run` once per training seed (`--set seed=S`, same questions), each into `out/seed-S/`,
    then `out/results.json`: the first seed's results as `run` writes them (so a reader of one
    seed needs no change), plus `seeds` and `by_seed` (every seed's calibration, metrics and
    records). The untuned baselines are the same evaluations in every seed."""
    seeds = [int(s) for s in seeds]
    if "seed" in overrides:
        raise FirstError("give the training seeds as seeds=[...], not also seed=...")
    if not seeds or len(set(seeds)) != len(seeds):
        raise FirstError(f"--seeds needs distinct seeds, got {seeds}")
    each = {}
    for seed in seeds:
        each[seed] = run(
            profile, setting, Path(out) / f"seed-{seed}", log=log, **overrides, seed=seed
        )
    results = combine_seeds(each)
    fsio.atomic_write_json(Path(out) / "results.json", results, indent=2, sort_keys=True)
    return results


def combine_seeds(each: dict) -> dict:
    """One results dict from the per-seed ones ({seed: results}, in order): the first seed's,
    plus `seeds` and `by_seed` (what `run_seeds` writes)."""
    seeds = [int(s) for s in each]
    results = dict(each[next(iter(each))])
    results["seeds"] = seeds
    results["by_seed"] = {str(s): {k: r[k] for k in PER_SEED if k in r} for s, r in each.items()}
    return results


def finished_seeds(out: Path) -> dict:
    """The seeds of a `--seeds` run that have finished (`out/seed-S/results.json`), combined as
    `run_seeds` combines them, for a run that is still going or was stopped; FirstError when no
    seed has finished."""
    found = {}
    for folder in Path(out).glob("seed-*"):
        tail = folder.name.removeprefix("seed-")
        if tail.isdigit() and (folder / "results.json").is_file():
            found[int(tail)] = json.loads((folder / "results.json").read_text())
    if not found:
        raise FirstError(f"no finished seed under {out} (seed-S/results.json)")
    seeds = sorted(found)
    for seed in seeds[1:]:
        keys = config_differences(found[seeds[0]].get("config", {}), found[seed].get("config", {}))
        if keys:
            raise FirstError(
                f"{out}: seed-{seed} was made with another configuration than seed-{seeds[0]} "
                f"(differs in {', '.join(keys)}); move the older seed folders away or rerun them"
            )
    return combine_seeds({s: found[s] for s in seeds})


def config_differences(a: dict, b: dict) -> list[str]:
    """The top-level keys in which two runs' recorded configs differ, the training seed (and
    what `_seedless` leaves out) aside: [] when they are seeds of one design."""
    a, b = _seedless(a), _seedless(b)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def _seedless(config: dict) -> dict:
    """A run's recorded config without the training seed (top level and in its training
    configs): what the seeds of one `--seeds` run share. The list of `seeds` (runs of seeds 0
    and of 1, 2 are one design), the profile's `per_setting` and `per_precision` tables and its
    `note` are left out
    too: the top level already holds the run's own setting's values, and an edit of another
    setting's entry (or of the prose) does not change this run."""
    drop = ("seed", "seeds", "per_setting", "per_precision", "note")
    out = {k: v for k, v in config.items() if k not in drop}
    for name in ("teacher_train", "student_train"):
        if isinstance(out.get(name), dict):
            out[name] = {k: v for k, v in out[name].items() if k != "seed"}
    return out


class _Run:
    """One run's state while it walks the graph: the process, the data, what each node made."""

    def __init__(self, prof: Profile, setting: str, precision: str, acc, log):
        self.prof, self.setting, self.precision = prof, setting, precision
        self.acc, self.log = acc, log
        self.data: dict = {}  # the run's questions (`load_questions`), read once by `_run`
        self.timings: dict[str, float] = {}
        self.made: dict[str, object] = {}  # node name -> folder, or the calibration meta
        self.tiny_dir: Path | None = None
        self._examples = None

    def timed(self, name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)
        return result

    def source(self, role: str) -> str:
        return model_source(self.prof, role, self.tiny_dir)

    def examples(self):
        """The tokenizer and the tokenized training and validation examples (once)."""
        if self._examples is None:
            from first_lib import models

            prof, src = self.prof, self.source("teacher")
            tok = models.load_tokenizer(src)
            models.check_same_vocabulary(tok, models.load_tokenizer(self.source("student")))
            if prof.k > len(tok):
                raise FirstError(
                    f"k = {prof.k} is larger than the vocabulary ({len(tok)} tokens of {src}): "
                    "the teacher's top-k cannot keep more tokens than it has"
                )
            split = {
                s: tokenize(tok, self.data[s], prof, self.setting) for s in ("train", "validation")
            }
            self._examples = (tok, split)
        return self._examples

    # one method per kind of node ------------------------------------------------------------

    def tiny_models(self, node: Node):
        self.tiny_dir = stages.tiny_models(self.prof, self.setting, self.data, self.log, self.acc)
        verify_upstream(self.tiny_dir, self.log, self.acc)  # its tokenizers are read here
        return self.tiny_dir

    def train(self, node: Node):
        tok, split = self.examples()
        cfg, store = node.train, None
        if cfg.loss == "kd":
            cfg, store = self.kd_config(cfg), self.made["extract"] / "train"
        args = (node.stage, node.key, self.source(node.role), tok, split["train"], cfg)
        return self.timed(
            node.variant, stages.stage_train, *args, self.acc, self.log, store_dir=store
        )

    def extract(self, node: Node):
        _, split = self.examples()
        args = (node.key, self.made["teacher"], split, self.prof, self.acc, self.log)
        return self.timed("extract", stages.stage_extract, *args)

    def calibrate(self, node: Node):
        _, split = self.examples()
        calib = None
        if self.acc.is_main_process:
            store = self.made["extract"] / "validation"
            args = (node.key, store, split["validation"], self.log)
            calib = self.timed("calibrate", stages.stage_calibrate, *args)
        stages._barrier(self.acc)
        return calib if calib is not None else read_meta(node.path)

    def check(self, node: Node):
        tok, split = self.examples()
        cfg, store = node.train, None
        if cfg.loss == "kd":
            cfg, store = self.kd_config(cfg), self.made["extract"] / "validation"
        trained = self.made[node.stage.removeprefix("check-")]
        args = (node.stage, node.key, trained, self.source(node.role), split["validation"], cfg)
        return self.timed(
            f"check_{node.variant}", stages.stage_check, *args, tok.pad_token_id, self.prof,
            self.acc, self.log,
            store_dir=store,
        )  # fmt: skip

    def kd_config(self, cfg):
        """A distillation's config with its coefficient, the calibration stage's choice."""
        calib = self.made["calibrate"]
        coef = {"none": 1.0, "ls": calib["delta"], "ts": calib["c_star"]}[cfg.transform]
        return replace(cfg, coef=coef)

    def evaluate(self, node: Node):
        split = node.reads[0]
        questions = self.data["validation"] if split == "validation" else self.data["tests"][split]
        args = (node.key, node.key["model"], questions, self.prof, self.acc, self.log)
        return self.timed(f"evaluate_{split}", stages.stage_evaluate, *args)

    def posthoc(self, node: Node):
        meta = None
        if self.acc.is_main_process:
            test, val = (artefact_dir("evaluate", node.key[k]) for k in ("test", "validation"))
            args = (node.key, test, val, self.prof, self.log)
            meta = self.timed(f"posthoc_{node.reads[0]}", stages.stage_posthoc, *args)
        stages._barrier(self.acc)
        return meta if meta is not None else read_meta(node.path)


def _run(prof: Profile, setting: str, out: Path | None, until: str | None, log) -> dict:
    """`run` for a resolved profile: the graph's nodes in order, then `results.json`."""
    log = log or (lambda msg: print(f"[first] {msg}", file=sys.stderr, flush=True))
    if until is not None and until not in UNTIL:
        raise FirstError(f"unknown stage {until!r}; choose one of {', '.join(UNTIL)}")
    if prof.threads:
        import torch

        torch.set_num_threads(prof.threads)
    precision = run_precision(prof)
    acc = stages.accelerator(precision)
    if not acc.is_main_process:
        log = lambda msg: None  # noqa: E731
    log(f"precision {precision} on {acc.device} ({device.requested_precision(prof.precision)})")
    nodes = stage_graph(prof, setting, precision)
    state = _Run(prof, setting, precision, acc, log)
    state.data = state.timed("data", load_questions, prof, setting)
    # every process checks the memory of the stages still to compute, from the model shapes
    # and the data's lengths, before the first; the main one prices their time (out/clock.json)
    work = clock.stage_work(prof, setting, state.data, clock._tokenizer_if_cached(prof), nodes)
    todo = clock.memory_needs(prof, setting, precision, work)
    if todo:
        name = max(todo, key=todo.get)
        node = next(n for n in nodes if n.name == name)
        w = next(w for w in work if w.stage == name)

        def advice(need, have):
            return memory.advice(node, w.source, w.params_b, precision, need, have)

        check_memory(todo[name], f"the stage {name!r} of profile {prof.name} ({precision})", acc,
                     advice)  # fmt: skip
    elif not work:  # a model's shape is unknown here: the weights, and a share for the rest
        pending = [
            estimate_memory_gb(n.params_b, n.key.get("train"), precision)
            for n in nodes
            if n.kind in ("train", "extract") and not n.done()
        ]
        check_memory(max(pending, default=0.0), f"profile {prof.name} ({precision})", acc)
    if acc.is_main_process:
        clock.start(prof, setting, precision, state.data, out, log, work=work)
    last = None
    if until is not None:  # the last node of that stage (`distill`: of every distill stage)
        last = max(i for i, n in enumerate(nodes) if n.stage.split("-")[0] == until)

    def walk() -> dict:
        for i, node in enumerate(nodes):
            cached = node.done()
            state.made[node.name] = getattr(state, node.kind.replace("-", "_"))(node)
            if not cached:  # what the stage freed, back to the system before the next (a stage
                memory.release(acc)  # found done freed nothing; its collection costs ~0.1 s)
            if i == last:
                return state.made["calibrate"] if until == "calibrate" else {}
        return _results(state, nodes, out)

    # An upstream artefact found corrupt when a stage reads it is moved aside; starting over
    # recomputes it (finished, intact artefacts are skipped at the cost of a stat each).
    for attempt in itertools.count():
        try:
            with memory.frozen_heap():
                return walk()
        except UpstreamCorrupt:
            if attempt >= len(nodes) + 1:  # recomputed artefacts keep failing their checks
                raise
    raise AssertionError("unreachable")


def _results(state: _Run, nodes: list[Node], out: Path | None) -> dict:
    """results.json: the resolved config, the calibration, the store, every evaluation."""
    prof, setting = state.prof, state.setting
    _, split = state.examples()
    calib, store = state.made["calibrate"], state.made["extract"]
    by_test = {}
    for test in test_tasks(prof, setting):
        evals = [n for n in nodes if n.kind in ("evaluate", "posthoc") and n.reads[0] == test]
        metrics = {n.variant: state.made[n.name]["metrics"] for n in evals}
        by_test[test] = {
            "n_test": len(state.data["tests"][test]),
            "variants": {v: metrics[v] for v in (*VARIANTS, *POSTHOC) if v in metrics},
            "baselines": {b: metrics[b] for b in BASELINES if b in metrics},
            "records": {n.variant: str(n.path / "records.jsonl") for n in evals},
        }
    store_meta = read_meta(store / "train")
    first = by_test[test_tasks(prof, setting)[0]]
    models = {v: state.made[n.stage] for n in nodes if n.kind == "train" for v in [n.variant]}
    models.update({n.stage: n.path for n in nodes if n.kind == "check"})  # named as the clock
    results = {
        "profile": prof.name,
        "setting": setting,
        "note": prof.note,
        "precision": state.precision,
        "config": prof.to_dict(),
        "teacher": prof.teacher,
        "student": prof.student,
        "n_train": len(split["train"]),
        "n_validation": len(split["validation"]),
        "n_test": first["n_test"],
        "c_star": calib["c_star"],
        "delta": calib["delta"],
        "calibration": {
            k: calib[k] for k in ("c_star_ece", "delta_ece", "ece_renormalised_top1", "n_positions")
        },
        "store": {
            "k": store_meta["k"],
            "bytes_per_token": store_meta["bytes_per_position"],
            "mean_topk_mass": store_meta["mean_topk_mass"],
        },
        "variants": first["variants"],
        "baselines": first["baselines"],
        "by_test": by_test,
        "artefacts": {k: str(v) for k, v in {**models, "store": store}.items()},
        # where a test cannot check training: each model's loss on held-out data of its task
        "held_out": {n.variant: state.made[n.name]["held_out"] for n in nodes if n.kind == "check"},
    }
    if out is not None and state.acc.is_main_process:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        for name, obj in (("results.json", results), ("timings.json", state.timings)):
            # a kill never leaves half a file
            fsio.atomic_write_json(folder / name, obj, indent=2, sort_keys=name == "results.json")
        state.log(f"wrote {folder / 'results.json'}")
    return results
