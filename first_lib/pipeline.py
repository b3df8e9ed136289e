"""The paper's stages as functions, each writing one artefact folder named by the hash of what made
it, and `first run`, which runs whatever is missing and writes `results.json`.

    teacher fine-tune (CE) -> extract top-k (train, validation) -> calibrate (c*, delta)
    student fine-tune (CE)        student distill (KL on the store: none | LS | TS)
                     \\___________________|___________________/
                                 evaluate -> results.json

Artefacts live under `first_home()/runs/<stage>-<hash>/`; `meta.json` is written last (fsynced)
and marks an artefact finished, so an interrupted stage is redone (training resumes from its
checkpoint, extraction from its last shard) and a finished one is never recomputed. meta.json
records the size and sha256 of every file of the artefact: sizes are checked whenever a stage
asks whether its artefact is done, the sha256s once per process when a stage reads an upstream
artefact. A meta.json that is corrupt or records another key, or files that do not match it,
are reported in one line, the folder moved aside (`.corrupt-<time>`) and the artefact
recomputed. A lock file stops two runs from writing the same artefact. Named crash points
(`fsio.crash_point`, `$FIRST_CRASH_AT`) sit in every commit window; see `scripts/crash_trial.py`.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from first_lib import device, fsio, prefix
from first_lib.errors import FirstError
from first_lib.paths import first_home
from first_lib.profiles import PROFILES, SETTINGS, Profile, for_setting, get_profile
from first_lib.train import TrainConfig

VARIANTS = ("teacher", "finetune", "distill", "distill_ls", "first_ts")
TRANSFORM_OF = {"distill": "none", "distill_ls": "ls", "first_ts": "ts"}


# ----------------------------------------------------------------------------- artefacts


def config_hash(obj) -> str:
    """A short, stable hash of a JSON-able description of what makes an artefact."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# The project's modules whose code each stage runs: a change to their code (not to comments,
# docstrings or formatting) changes the stage's key, so old results are never served to new code.
CODE_OF = {
    "train": (
        "first_lib.train",
        "first_lib.losses",
        "first_lib.calibration",
        "first_lib.models",
        "first_lib.prefix",
    ),
    "extract": ("first_lib.knowledge", "first_lib.models", "first_lib.prefix"),
    "calibrate": ("first_lib.calibration", "first_lib.metrics"),
    "evaluate": ("first_lib.evaluate", "first_lib.metrics", "first_lib.models", "first_lib.prefix"),
    "tiny-models": ("first_lib.models",),
}
_MODULE_HASHES: dict[str, str] = {}  # module name -> source_hash of its file, once per process


def source_hash(source: str) -> str:
    """sha256 of `ast.dump` of Python `source` with every docstring removed: comments, docstrings
    and formatting do not change it; code does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                node.body = node.body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def module_hash(name: str) -> str:
    """`source_hash` of module `name`'s file, read without importing the module (cached)."""
    if name not in _MODULE_HASHES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise FirstError(f"cannot find the source of module {name}")
        _MODULE_HASHES[name] = source_hash(Path(spec.origin).read_text(encoding="utf-8"))
    return _MODULE_HASHES[name]


def code_version(modules) -> str:
    """A short hash of the code of `modules` (names of the project's modules)."""
    text = "\n".join(f"{name} {module_hash(name)}" for name in sorted(modules))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def artefact_dir(stage: str, key: dict) -> Path:
    return first_home() / "runs" / f"{stage}-{config_hash(key)}"


def _meta_problem(path: Path, key: dict | None = None) -> str | None:
    """Why `path/meta.json` does not mark a finished artefact of `key` (None: it does). A missing
    meta.json is a problem too ("missing"): the stage has not finished."""
    try:
        text = (path / "meta.json").read_text()
    except FileNotFoundError:
        return "missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"meta.json is unreadable ({' '.join(str(err).split())})"
    if not text.strip():
        return "meta.json is corrupt (empty)"
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        return f"meta.json is corrupt ({err})"
    if not isinstance(meta, dict):
        return "meta.json is corrupt (not a JSON object)"
    if key is not None:
        want = json.loads(json.dumps(key, default=str))  # tuples and paths as JSON stores them
        if meta.get("key") != want:
            got = config_hash(meta["key"]) if "key" in meta else "none"
            return f"meta.json records another key (hash {got}, expected {config_hash(key)})"
    files = meta.get("files", {})  # artefacts made before file tables were recorded: none
    if not isinstance(files, dict):
        return "meta.json is corrupt (its file table is not a JSON object)"
    return fsio.table_problem(path, files)


def is_done(path: Path, key: dict | None = None) -> bool:
    """Whether `path` is a finished artefact: its meta.json parses, (when `key` is given) records
    `key`, and every file it lists is there with its recorded size."""
    return _meta_problem(path, key) is None


def claim_done(path: Path, key: dict, log) -> bool:
    """`is_done(path, key)`, except that a meta.json that is corrupt or records another key, or
    a listed file that is missing or has another size, is reported in one line and the folder
    moved aside (renamed `<name>.corrupt-<time>`, never deleted), so the caller recomputes the
    artefact. Call it holding the artefact's lock."""
    problem = _meta_problem(path, key)
    if problem is None:
        return True
    if problem == "missing":
        return False
    _move_aside(path, problem, log)
    return False


def _move_aside(path: Path, problem: str, log) -> None:
    """Rename artefact `path` to `<name>.corrupt-<time>` and say why in one line."""
    _VERIFIED.discard(str(path))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(aside)
    fsio.fsync_dir(path.parent)
    log(f"{path.name}: {problem}; moved aside to {aside.name} and recomputing")


class UpstreamCorrupt(FirstError):
    """An artefact a stage was about to read did not match its meta.json and was moved aside;
    `run` starts over, which recomputes it."""


_VERIFIED: set[str] = set()  # artefact folders whose sha256s matched, once per process


def artefact_of(path) -> Path | None:
    """The artefact folder under `first_home()/runs` that holds `path` (None: not in one)."""
    runs = first_home() / "runs"
    try:
        rel = Path(path).relative_to(runs)
    except ValueError:
        return None
    return runs / rel.parts[0] if rel.parts else None


def _hash_problem(root: Path) -> str | None:
    problem = _meta_problem(root)
    if problem is None:
        problem = fsio.table_problem(root, read_meta(root).get("files", {}), hashes=True)
    if problem is None and root.name.startswith("extract-"):
        from first_lib.knowledge import MANIFEST

        for manifest in sorted(root.glob(f"*/{MANIFEST}")):  # a store's own file hashes
            rel = manifest.relative_to(root)
            try:
                shards = json.loads(manifest.read_text())["shards"]
                table = {
                    f"{s['name']}/{name}": {"size": f["bytes"], "sha256": f["sha256"]}
                    for s in shards
                    for name, f in s["files"].items()
                }
            except (OSError, ValueError, KeyError, TypeError):
                return f"{rel} is unreadable"
            problem = fsio.table_problem(manifest.parent, table, hashes=True, source=str(rel))
            if problem is not None:
                return f"{manifest.parent.name}/{problem}"
    return problem


def verify_upstream(path, log, acc=None) -> None:
    """Before a stage reads `path`: the sha256 of every file its artefact's meta.json lists (for
    a top-k store also the MANIFEST's), once per process. A mismatch is reported in one line,
    the artefact moved aside (by the main process) and `UpstreamCorrupt` raised."""
    root = artefact_of(path)
    if root is None or str(root) in _VERIFIED:
        return
    main = acc is None or acc.is_main_process
    with artefact_lock(root, log=log) if main else contextlib.nullcontext():
        problem = _hash_problem(root)
        if problem is None:
            _VERIFIED.add(str(root))
            return
        if main and root.exists():
            _move_aside(root, problem, log)
    raise UpstreamCorrupt(f"{root.name}: {problem}")


@contextlib.contextmanager
def artefact_lock(path: Path, wait: bool = True, log=None) -> Iterator[None]:
    """An exclusive lock on `path` (a sibling `.lock` file): a second run says so and waits
    (`wait`), or refuses. The kernel drops the lock of a killed process."""
    what = f"another run is writing {path.name} (lock {path.name}.lock)"
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(fsio.file_lock(path.with_name(path.name + ".lock"), log, what, wait))
        except BlockingIOError as err:
            raise FirstError(f"another run is writing {path}; wait for it to finish") from err
        yield


def write_meta(path: Path, meta: dict) -> None:
    """Write meta.json atomically and fsynced, with the size and sha256 of every other file of
    the artefact (`files`); its presence marks the artefact finished."""
    for stale in path.glob(".meta.json.tmp-*"):  # left by a run killed while writing it
        stale.unlink(missing_ok=True)
    meta = {**meta, "files": fsio.file_table(path)}
    fsio.atomic_write_json(
        path / "meta.json", meta, indent=2, default=str, crash_at="meta:tmp-written"
    )
    fsio.crash_point("meta:written")


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


# ----------------------------------------------------------------------------- processes


def accelerator(precision: str):
    """The process's `Accelerator` at `precision` (see `first_lib.device.accelerator`)."""
    return device.accelerator(precision)


def model_dtype(precision: str):
    """Weights of loaded models: bf16 at bf16, fp32 at fp32."""
    return device.torch_dtype(precision)


def run_precision(prof: Profile) -> str:
    """The precision a run of `prof` computes in: its `precision` field, else $FIRST_PRECISION,
    else auto (bf16 where the hardware runs it natively, fp32 elsewhere)."""
    return device.resolve_precision(prof.precision)


def _barrier(acc) -> None:
    if acc.num_processes > 1:
        acc.wait_for_everyone()


# ----------------------------------------------------------------------------- data


def prompt_fingerprint() -> str:
    """A hash of the prompt format (rendered probe prompts and answer cues, both styles), so an
    edit to the templates can never reuse artefacts made with the old ones."""
    from first_lib import tasks

    parts = []
    for task in ("csqa", "boolq", "obqa"):
        q = tasks.probe_question(task)
        parts += [tasks.render_prompt(q, None, "plain"), tasks.answer_cue(q, "chat")]
    example = tasks.InstructionExample("probe", "mix", "Say hi.", "to me", "Hi.")
    parts.append(tasks.render_instruction(example, None, "plain"))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]


def data_key(prof: Profile, setting: str) -> dict:
    """What determines the data of a run, without reading it (so --dry-run stays cheap)."""
    return {
        "prompts": prompt_fingerprint(),
        "setting": setting,
        "n": [prof.n_train, prof.n_val],  # training data only: test sizes never retrain
        "seed": prof.seed,
        "style": prof.style,
        "max_length": prof.max_length,
        "tokenizer": prof.teacher if not prof.teacher.startswith("tiny:") else "tiny",
    }


def test_tasks(setting: str) -> list[str]:
    return ["csqa", "obqa"] if setting == "ood" else [setting]


def load_questions(prof: Profile, setting: str) -> dict:
    """Rows of the run: train / validation (questions or instruction examples) and test sets."""
    from first_lib import tasks

    if setting == "ood":
        train = tasks.instruction_mix(prof.n_train, seed=prof.seed, split="train")
        val = tasks.instruction_mix(prof.n_val, seed=prof.seed, split="validation")
    else:
        train = tasks.subset(tasks.load_task(setting, "train"), prof.n_train, prof.seed)
        val = tasks.subset(tasks.load_task(setting, "validation"), prof.n_val, prof.seed)
    tests = {
        t: tasks.subset(tasks.load_task(t, "test"), prof.n_test, prof.seed)
        for t in test_tasks(setting)
    }
    for name, rows in [("train", train), ("validation", val), *tests.items()]:
        if not rows:
            raise FirstError(f"the {name} split of setting {setting!r} is empty")
    return {"train": train, "validation": val, "tests": tests}


def tokenize(tokenizer, rows, prof: Profile, setting: str) -> list[dict]:
    from first_lib import tasks

    if setting == "ood":
        return tasks.tokenize_instruction(tokenizer, rows, prof.style, prof.max_length)
    return tasks.tokenize_mc(tokenizer, rows, prof.style, prof.max_length)


# ----------------------------------------------------------------------------- models


def corpus_text(groups) -> list[str]:
    """Every rendered prompt and answer of the run's rows (the tiny tokenizer's training text)."""
    from first_lib import tasks

    texts = []
    for rows in groups:
        for row in rows:
            if isinstance(row, tasks.MCQuestion):
                texts.append(tasks.render_prompt(row, None, "plain"))
                texts.extend(row.choices)
            else:
                texts.append(tasks.render_instruction(row, None, "plain") + row.output)
    return texts


def tiny_key(prof: Profile, setting: str) -> dict:
    return {
        "stage": "tiny-models",
        "data": data_key(prof, setting),
        "n_test": prof.n_test,  # the tokenizer is trained on the test prompts too
        "seed": prof.seed,
        "code": code_version(CODE_OF["tiny-models"]),
        "v": 1,
    }


def prefix_top_layers(prof: Profile, label: str) -> int:
    """The top layers that evaluating (or extracting with) model `label` (a variant,
    "teacher_base" or "student_base") runs from cached bottom states (`first_lib.prefix`): the
    LoRA depth of its model's training, also for the untuned model, so that it and its tuned
    variants share one cache entry; 0 (the whole model) for full fine-tuning."""
    cfg = prof.teacher_train if label.startswith("teacher") else prof.student_train
    return cfg.lora_layers if cfg.lora_r > 0 else 0


def eval_key(prof: Profile, test_name: str, model, precision: str, top_layers: int = 0) -> dict:
    """An evaluation: the model, the test set (not the setting, so the untuned baselines are
    shared between settings that test on the same set), the precision it computes in and the
    top layers it runs from cached bottom states (`prefix_top_layers`)."""
    return {
        "model": str(model),
        "precision": precision,
        "top_layers": top_layers,
        "test": test_name,
        "n_test": prof.n_test,
        "seed": prof.seed,
        "max_length": prof.max_length,
        "style": prof.style,
        "n_boot": prof.n_boot,
        "code": code_version(CODE_OF["evaluate"]),
    }


def tiny_models(prof: Profile, setting: str, data: dict, log, acc) -> Path:
    """Random tiny Qwen2-architecture teacher and student with a tokenizer trained on the slice.
    TINY RANDOM MODELS: for fast tests only. Built by the main process; the others wait."""
    from first_lib import models

    key = tiny_key(prof, setting)
    out = artefact_dir("tiny-models", key)
    if is_done(out, key) or not acc.is_main_process:
        _barrier(acc)
        return out
    with artefact_lock(out, log=log):
        if claim_done(out, key, log):
            _barrier(acc)
            return out
        log("tiny-models: training a tiny tokenizer and building random models")
        texts = corpus_text([data["train"], data["validation"], *data["tests"].values()])
        tok = models.make_tiny_tokenizer(texts)
        shutil.rmtree(out, ignore_errors=True)
        for role in ("teacher", "student"):
            model = models.make_tiny_model(
                len(tok),
                size=role,
                seed=prof.seed,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            model.save_pretrained(out / role, safe_serialization=True)
            tok.save_pretrained(out / role)
        fsio.crash_point("tiny-models:files-written")
        write_meta(out, {"stage": "tiny-models", "key": key, "note": prof.note})
    _barrier(acc)
    return out


def model_source(prof: Profile, role: str, tiny_dir: Path | None) -> str:
    name = prof.teacher if role == "teacher" else prof.student
    if name.startswith("tiny:"):
        return str(tiny_dir / name.split(":", 1)[1])
    return name


def _load(source: str, acc):
    from first_lib import models

    return models.load_model(
        source, dtype=model_dtype(device.accelerator_precision(acc)), device=acc.device
    )


def _save_model(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- stages


def stage_train(
    name: str,
    key: dict,
    source: str,
    tokenizer,
    examples: list[dict],
    cfg: TrainConfig,
    acc,
    log,
    store_dir: Path | None = None,
) -> Path:
    """Fine-tune (CE) or distill (KD on the store at `store_dir`); returns the model folder."""
    from first_lib import train

    out = artefact_dir(name, key)
    if is_done(out, key):
        return out
    lock = artefact_lock(out, log=log) if acc.is_main_process else contextlib.nullcontext()
    with lock:
        if claim_done(out, key, log) if acc.is_main_process else is_done(out, key):
            return out
        verify_upstream(source, log, acc)
        if store_dir is not None:
            verify_upstream(store_dir, log, acc)
        work = out.with_name(out.name + ".work")
        work.mkdir(parents=True, exist_ok=True)
        teacher = None
        if store_dir is not None:
            from first_lib.knowledge import TopKStore

            store = TopKStore(store_dir)
            store.check_alignment(examples)
            store.validate()  # NaN / inf, ids outside the vocabulary, a broken index
            teacher = store.example
        log(f"{name}: training {source} ({cfg.loss}, lora_r={cfg.lora_r}) -> {out}")
        t0 = time.perf_counter()
        model = _load(source, acc)
        model, tlog = train.train(
            model,
            examples,
            cfg,
            pad_id=tokenizer.pad_token_id,
            teacher=teacher,
            work_dir=work,
            accelerator=acc,
            log=log,
            prefix_cache=prefix.cache_root(),
        )
        if acc.is_main_process:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _save_model(model, tokenizer, tmp)
            fsio.crash_point("train:model-tmp-written")
            if out.exists():
                shutil.rmtree(out)
                fsio.crash_point("train:old-removed")
            tmp.rename(out)
            fsio.fsync_dir(out.parent)
            fsio.crash_point("train:model-renamed")
            tlog.update(
                stage=name,
                key=key,
                source=source,
                precision=device.accelerator_precision(acc),
                wall_seconds=time.perf_counter() - t0,
            )
            write_meta(out, tlog)
            fsio.crash_point("train:meta-written")
            shutil.rmtree(work, ignore_errors=True)
    _barrier(acc)
    return out


def stage_extract(key: dict, teacher_dir: Path, splits: dict, prof: Profile, acc, log) -> Path:
    """The teacher's top-k over the training and validation sets, one store each."""
    from first_lib import flops, knowledge

    out = artefact_dir("extract", key)
    if is_done(out, key):
        return out
    with artefact_lock(out, log=log) if acc.is_main_process else contextlib.nullcontext():
        if claim_done(out, key, log) if acc.is_main_process else is_done(out, key):
            return out
        verify_upstream(teacher_dir, log, acc)
        out.mkdir(parents=True, exist_ok=True)
        model = _load(str(teacher_dir), acc)
        tally = flops.Tally(flops.shape_of_config(model.config))
        t0 = time.perf_counter()
        for split, examples in splits.items():
            log(f"extract: top-{prof.k} of the teacher over {len(examples)} {split} examples")
            knowledge.extract_topk(
                model,
                examples,
                out / split,
                k=prof.k,
                batch_size=prof.extract_batch,
                teacher_name=str(teacher_dir),
                process_index=acc.process_index,
                num_processes=acc.num_processes,
                autocast=device.accelerator_precision(acc) == "bf16",
                tally=tally,
                top_layers=prefix_top_layers(prof, "teacher"),
                prefix_cache=prefix.cache_root(),
            )
            _barrier(acc)
            if acc.is_main_process:
                knowledge.finalize_store(out / split)
                fsio.crash_point("extract:manifest-written")
            _barrier(acc)
        if acc.is_main_process:
            precision = device.accelerator_precision(acc)
            meta = {"stage": "extract", "key": key, "precision": precision}
            perf = tally.record(precision, acc.device.type)
            write_meta(out, {**meta, "wall_seconds": time.perf_counter() - t0, "perf": perf})
    _barrier(acc)
    return out


def calibration_data(store_dir: Path, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probs [N, k] of the teacher at every stored position, and the rank of the true next
    token among them ([N], -1 when outside the top-k)."""
    from first_lib.knowledge import TopKStore

    store = TopKStore(store_dir)
    store.check_alignment(examples)
    store.validate()  # NaN / inf, ids outside the vocabulary, a broken index
    probs, ranks = [], []
    for i, ex in enumerate(examples):
        ids_k, probs_k = store.example(i)
        ids = np.asarray(ex["input_ids"])
        pos = np.flatnonzero(np.asarray(ex["target_mask"][: len(ids) - 1]))
        gold = ids[pos + 1]
        hit = ids_k == gold[:, None]
        ranks.append(np.where(hit.any(1), hit.argmax(1), -1))
        probs.append(probs_k)
    return np.concatenate(probs).astype(np.float64), np.concatenate(ranks)


def stage_calibrate(key: dict, store_dir: Path, examples: list[dict], log) -> dict:
    """Grid-search c (temperature scaling, eq. 4) and delta (label smoothing, eq. 3) that minimise
    the teacher's ECE on the validation store; ECE of the top-1 token at each stored position."""
    from first_lib import calibration, metrics

    out = artefact_dir("calibrate", key)
    if is_done(out, key):
        return read_meta(out)
    with artefact_lock(out, log=log):
        if claim_done(out, key, log):
            return read_meta(out)
        verify_upstream(store_dir, log)
        out.mkdir(parents=True, exist_ok=True)
        probs, ranks = calibration_data(store_dir, examples)
        raw_conf = probs.max(1) / np.clip(probs.sum(1), 1e-12, None)
        raw_ece = metrics.ece(raw_conf, ranks == probs.argmax(1))
        ts = calibration.search_coefficient(probs, ranks, kind="ts")
        ls = calibration.search_coefficient(probs, ranks, kind="ls")
        meta = {
            "stage": "calibrate",
            "key": key,
            "precision": key["extract"]["teacher"]["precision"],
            "n_positions": int(len(ranks)),
            "ece_renormalised_top1": float(raw_ece),
            "c_star": ts.best,
            "c_star_ece": ts.best_ece,
            "delta": ls.best,
            "delta_ece": ls.best_ece,
            "ts_curve": {"coarse": ts.coarse, "fine": ts.fine},
            "ls_curve": {"coarse": ls.coarse, "fine": ls.fine},
        }
        log(
            f"calibrate: c*={ts.best:.2f} (ECE {ts.best_ece:.4f}), delta={ls.best:.2f} (ECE {ls.best_ece:.4f})"
        )
        fsio.crash_point("calibrate:computed")
        write_meta(out, meta)
    return meta


def stage_evaluate(key: dict, model_dir: str, questions: list, prof: Profile, acc, log) -> dict:
    """Multiple-choice evaluation: per-question records and metrics with bootstrap intervals;
    the top `key["top_layers"]` layers run from cached bottom states (`first_lib.prefix`)."""
    from first_lib import evaluate, flops, models

    out = artefact_dir("evaluate", key)
    if not is_done(out, key) and acc.is_main_process:
        with artefact_lock(out, log=log):
            if not claim_done(out, key, log):
                verify_upstream(model_dir, log, acc)
                out.mkdir(parents=True, exist_ok=True)
                log(f"evaluate: {model_dir} on {len(questions)} questions")
                t0 = time.perf_counter()
                model = _load(model_dir, acc)
                tok = models.load_tokenizer(model_dir)
                precision = device.accelerator_precision(acc)
                config = evaluate.EvalConfig(
                    style=prof.style,
                    batch_size=prof.eval_batch,
                    n_boot=prof.n_boot,
                    seed=prof.seed,
                    autocast=precision == "bf16",
                    top_layers=key["top_layers"],
                )
                tally = flops.Tally(flops.shape_of_config(model.config))
                _, summary = evaluate.run_evaluation(
                    config,
                    model,
                    tok,
                    questions,
                    out,
                    tally=tally,
                    prefix_cache=prefix.cache_root(),
                    log=log,
                )
                fsio.crash_point("evaluate:records-written")
                write_meta(
                    out,
                    {
                        "stage": "evaluate",
                        "key": key,
                        "metrics": summary,
                        "precision": precision,
                        "wall_seconds": time.perf_counter() - t0,
                        "perf": tally.record(precision, acc.device.type),
                    },
                )
    _barrier(acc)
    return read_meta(out)


# ----------------------------------------------------------------------------- the plan


def plan(prof: Profile, setting: str, precision: str | None = None) -> list[dict]:
    """The stages of a run with their artefact keys, computable without loading any model.
    `precision` ("fp32" | "bf16") defaults to the one this machine resolves for `prof`; it is
    part of every key, so runs at different precisions never share an artefact."""
    precision = precision or run_precision(prof)
    dk = data_key(prof, setting)
    tcfg, scfg = prof.teacher_train.to_dict(), prof.student_train.to_dict()
    code = {stage: code_version(modules) for stage, modules in CODE_OF.items()}
    teacher_key = {"source": prof.teacher, "data": dk, "train": tcfg, "precision": precision}
    teacher_key["code"] = code["train"]
    extract_key = {"teacher": teacher_key, "k": prof.k, "code": code["extract"]}
    calib_key = {"extract": extract_key, "ece": "answer" if setting != "ood" else "token"}
    calib_key["code"] = code["calibrate"]
    steps = [
        {"stage": "teacher", "key": teacher_key, "params_b": prof.params_b[0], "train": tcfg},
        {"stage": "extract", "key": extract_key, "params_b": prof.params_b[0]},
        {"stage": "calibrate", "key": calib_key, "params_b": 0},
        {
            "stage": "finetune",
            "key": {
                "source": prof.student,
                "data": dk,
                "train": scfg,
                "precision": precision,
                "code": code["train"],
            },
            "params_b": prof.params_b[1],
            "train": scfg,
        },
    ]
    for variant, transform in TRANSFORM_OF.items():
        kd = {**scfg, "loss": "kd", "transform": transform}
        steps.append(
            {
                "stage": f"distill-{transform}",
                "key": {
                    "source": prof.student,
                    "extract": extract_key,
                    "calibrate": calib_key,
                    "train": kd,
                    "precision": precision,
                    "code": code["train"],
                },
                "params_b": prof.params_b[1],
                "train": kd,
                "variant": variant,
            }
        )
    return steps


def evaluations(prof: Profile, setting: str, precision: str) -> list[tuple[str, str, dict]]:
    """(model name, test, key) of every evaluation of a run: the five variants and, with
    baselines, the untuned teacher and student (computable before the tiny models exist only for
    real sources)."""
    steps = {s["stage"]: s for s in plan(prof, setting, precision)}
    dirs = {name: artefact_dir(name, s["key"]) for name, s in steps.items()}
    models = {"teacher": dirs["teacher"], "finetune": dirs["finetune"]}
    models.update({v: dirs[f"distill-{t}"] for v, t in TRANSFORM_OF.items()})
    if prof.baselines and not prof.teacher.startswith("tiny:"):
        models.update(teacher_base=prof.teacher, student_base=prof.student)
    return [
        (name, test, eval_key(prof, test, model, precision, prefix_top_layers(prof, name)))
        for test in test_tasks(setting)
        for name, model in models.items()
    ]


def missing(prof: Profile, setting: str, precision: str | None = None) -> list[str]:
    """What a run would still compute: stage names, and `evaluate <model> on <test>`, from the
    keys alone (nothing is loaded)."""
    precision = precision or run_precision(prof)
    todo = [
        s["stage"]
        for s in plan(prof, setting, precision)
        if not is_done(artefact_dir(s["stage"], s["key"]), s["key"])
    ]
    for name, test, key in evaluations(prof, setting, precision):
        if not is_done(artefact_dir("evaluate", key), key):
            todo.append(f"evaluate {name} on {test}")
    return todo


def estimate_memory_gb(params_b: float, train: dict | None, precision: str = "bf16") -> float:
    """Rough peak memory of a stage: weights at the run's precision (2 bytes at bf16, 4 at fp32)
    for inference and LoRA; fp32 weights, grads and AdamW moments (16 bytes a parameter) for full
    fine-tuning; plus 25% for activations (50% when training LoRA)."""
    weight_bytes = 2 if precision == "bf16" else 4
    if not train:
        return params_b * weight_bytes * 1.25
    if train.get("lora_r", 0) > 0:
        return params_b * weight_bytes * 1.5
    return params_b * 16 * 1.25


def available_memory_gb() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.mem_get_info()[1] / 1e9
    except Exception:  # noqa: BLE001 - no torch or no CUDA: fall back to RAM
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def describe_plan(prof: Profile, setting: str) -> str:
    precision = run_precision(prof)
    asked = device.requested_precision(prof.precision)
    lines = [
        f"profile {prof.name} ({prof.note}), setting {setting}",
        f"teacher {prof.teacher} -> student {prof.student}; k={prof.k}; style={prof.style}",
        f"precision {precision}" + (" (auto on this machine)" if asked == "auto" else ""),
        f"sizes: train {prof.n_train or 'all'}, validation {prof.n_val or 'all'}, "
        f"test {prof.n_test or 'all'} on {', '.join(test_tasks(setting))}",
        f"artefacts under {first_home() / 'runs'}",
    ]
    from first_lib import clock

    est = {r["stage"]: r for r in clock.estimate(prof, setting, precision)}
    lines.append(
        f"{'stage':<34} {'status':<8} {'memory':>8} {'time':>9}  artefact  (memory: total, "
        "before sharding; time: estimated for this machine)"
    )

    def minutes(stage: str) -> str:
        return f"{est[stage]['seconds'] / 60:6.1f} min" if stage in est else "        ?"

    for step in plan(prof, setting, precision):
        path = artefact_dir(step["stage"], step["key"])
        problem = _meta_problem(path, step["key"])
        status = "done" if problem is None else "missing" if problem == "missing" else "corrupt"
        mem = estimate_memory_gb(step["params_b"], step.get("train"), precision)
        lines.append(
            f"{step['stage']:<34} {status:<8} {mem:>5.1f} GB {minutes(step['stage'])}  {path.name}"
        )
    for stage, row in est.items():
        if stage.startswith("evaluate"):
            status = "done" if row["done"] else "missing"
            lines.append(f"{stage:<34} {status:<8} {'':>8} {minutes(stage)}")
    if not est:
        base = " (+ the untuned teacher and student)" if prof.baselines else ""
        lines.append(f"evaluate: {', '.join(VARIANTS)} on {', '.join(test_tasks(setting))}{base}")
    lines.append(clock.describe(list(est.values())))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- clean


def run_artefacts(prof: Profile, setting: str, precision: str) -> set[str]:
    """Names of every artefact a run of `prof` x `setting` at `precision` uses (the plan, the tiny
    models and the evaluations), computed from the keys without loading anything."""
    steps = plan(prof, setting, precision)
    dirs = {s["stage"]: artefact_dir(s["stage"], s["key"]) for s in steps}
    names = {p.name for p in dirs.values()}
    tiny = None
    if prof.teacher.startswith("tiny:"):
        tiny = artefact_dir("tiny-models", tiny_key(prof, setting))
        names.add(tiny.name)
    models = {"teacher": dirs["teacher"], "finetune": dirs["finetune"]}
    models.update({v: dirs[f"distill-{t}"] for v, t in TRANSFORM_OF.items()})
    if prof.baselines:
        models.update({f"{r}_base": model_source(prof, r, tiny) for r in ("teacher", "student")})
    for test_name in test_tasks(setting):
        for label, m in models.items():
            key = eval_key(prof, test_name, m, precision, prefix_top_layers(prof, label))
            names.add(artefact_dir("evaluate", key).name)
    return names


def live_artefacts() -> set[str]:
    """Names of every artefact a built-in profile and setting of this version would use at either
    precision, plus those of runs in progress (`in_use`)."""
    names = set()
    combos = itertools.product(PROFILES.values(), SETTINGS, ("fp32", "bf16"))
    for base, setting, precision in combos:
        names |= run_artefacts(for_setting(base, setting), setting, precision)
    return names | names_in_use()


def _in_use_dir() -> Path:
    return first_home() / "runs" / ".in-use"


@contextlib.contextmanager
def in_use(names: set[str]) -> Iterator[None]:
    """Register `names` as used by this process while the block runs: a file listing them, held
    under an exclusive lock, so `first clean` keeps them (a run with `--set` whose keys no
    built-in profile names included). The kernel drops the lock of a killed process."""
    folder = _in_use_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{os.getpid()}-{time.monotonic_ns()}.json"
    tmp = path.with_suffix(".tmp")  # locked before it gets the name `names_in_use` reads
    with open(tmp, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(sorted(names)))
        fh.flush()
        os.replace(tmp, path)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


def names_in_use() -> set[str]:
    """Artefact names registered by runs in progress; registrations of dead runs are removed."""
    names: set[str] = set()
    folder = _in_use_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            with open(path) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:  # held: the run is alive
                    names.update(json.loads(path.read_text() or "[]"))
                    continue
                fcntl.flock(fh, fcntl.LOCK_UN)
            path.unlink(missing_ok=True)  # nobody holds it: a run that was killed
        except (OSError, ValueError):
            continue
    return names


def _is_locked(path: Path) -> bool:
    """Whether another process holds the lock of artefact `path` (writing it right now)."""
    try:
        with artefact_lock(path, wait=False):
            return False
    except FirstError:
        return True


def clean(apply: bool = False, log=print) -> tuple[list[Path], int]:
    """The artefacts under `first_home()/runs` that no built-in profile and setting of this version
    uses (older versions' keys, `--set` overrides), with their total size; deleted when `apply`.
    Artefacts of runs in progress (`in_use`, e.g. with `--set`), in-progress work of a live key
    (`.work`, `.tmp`) and anything whose lock is held are kept; folders moved aside as corrupt
    (`.corrupt-*`) and the `.work` leftovers of finished artefacts are stale."""
    runs = first_home() / "runs"
    live = live_artefacts()
    stale, total, kept = [], 0, 0
    for path in sorted(runs.iterdir()) if runs.is_dir() else []:
        if path.name == ".in-use":
            continue
        name = path.name.split(".", 1)[0]  # <stage>-<hash>, without .lock / .work / .tmp
        aside = ".corrupt-" in path.name  # moved aside by `claim_done`: never in use
        # the work folder of a finished artefact is left over (a kill before its removal)
        leftover = path.name.endswith(".work") and is_done(runs / name)
        if leftover and not _is_locked(runs / name):
            aside = True
        if name in live and not aside:
            kept += 1
            continue
        if not aside and (runs / f"{name}.lock").exists() and _is_locked(runs / name):
            log(f"kept {path.name}: another run holds its lock")
            kept += 1
            continue
        size = fsio.dir_size(path)
        stale.append(path)
        total += size
        log(f"{'removed' if apply else 'stale'}  {path.name}  {size / 1e9:.2f} GB")
        if apply:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    verb = "removed" if apply else "would remove (run again with --yes)"
    log(f"{verb}: {len(stale)} entries, {total / 1e9:.2f} GB; kept {kept} entries in use")
    return stale, total


def _cmd_clean(args) -> int:
    clean(apply=args.yes)
    return 0


# ----------------------------------------------------------------------------- the run


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


def _run(prof: Profile, setting: str, out: Path | None, until: str | None, log) -> dict:
    """`run` for a resolved profile."""
    from first_lib import models

    log = log or (lambda msg: print(f"[first] {msg}", file=sys.stderr, flush=True))
    if prof.threads:
        import torch

        torch.set_num_threads(prof.threads)
    precision = run_precision(prof)
    acc = accelerator(precision)
    if not acc.is_main_process:
        log = lambda msg: None  # noqa: E731
    log(f"precision {precision} on {acc.device} ({device.requested_precision(prof.precision)})")
    steps = {s["stage"]: s for s in plan(prof, setting, precision)}
    needed = max(
        estimate_memory_gb(s["params_b"], s.get("train"), precision) for s in steps.values()
    )
    if str(acc.distributed_type).split(".")[-1] in ("FSDP", "DEEPSPEED"):
        needed /= acc.num_processes  # sharded weights, gradients and optimizer state
    have = available_memory_gb()
    if needed > have:
        raise FirstError(
            f"profile {prof.name} needs about {needed:.0f} GB for its largest stage but this machine "
            f"has {have:.0f} GB; use a smaller profile or a bigger machine"
        )
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        return result

    data = timed("data", load_questions, prof, setting)
    if acc.is_main_process:  # estimates go to out/clock.json, apart from the results
        _start_clock(prof, setting, precision, data, out, log)

    def stages() -> dict:
        tiny_dir = None
        if prof.teacher.startswith("tiny:"):
            tiny_dir = tiny_models(prof, setting, data, log, acc)
            verify_upstream(tiny_dir, log, acc)  # its tokenizers are read here
        teacher_src = model_source(prof, "teacher", tiny_dir)
        student_src = model_source(prof, "student", tiny_dir)
        tok = models.load_tokenizer(teacher_src)
        models.check_same_vocabulary(tok, models.load_tokenizer(student_src))
        if prof.k > len(tok):
            raise FirstError(
                f"k = {prof.k} is larger than the vocabulary ({len(tok)} tokens of {teacher_src}): "
                "the teacher's top-k cannot keep more tokens than it has"
            )
        train_ex = tokenize(tok, data["train"], prof, setting)
        val_ex = tokenize(tok, data["validation"], prof, setting)

        s = steps["teacher"]
        teacher_dir = timed(
            "teacher",
            stage_train,
            "teacher",
            s["key"],
            teacher_src,
            tok,
            train_ex,
            prof.teacher_train,
            acc,
            log,
        )
        if until == "teacher":
            return {}
        s = steps["extract"]
        store = timed(
            "extract",
            stage_extract,
            s["key"],
            teacher_dir,
            {"train": train_ex, "validation": val_ex},
            prof,
            acc,
            log,
        )
        if until == "extract":
            return {}
        calib = (
            timed(
                "calibrate",
                stage_calibrate,
                steps["calibrate"]["key"],
                store / "validation",
                val_ex,
                log,
            )
            if acc.is_main_process
            else None
        )
        _barrier(acc)
        if calib is None:
            calib = read_meta(artefact_dir("calibrate", steps["calibrate"]["key"]))
        if until == "calibrate":
            return calib
        s = steps["finetune"]
        model_dirs = {"teacher": teacher_dir}
        model_dirs["finetune"] = timed(
            "finetune",
            stage_train,
            "finetune",
            s["key"],
            student_src,
            tok,
            train_ex,
            prof.student_train,
            acc,
            log,
        )
        if until == "finetune":
            return {}
        coefs = {"none": 1.0, "ls": calib["delta"], "ts": calib["c_star"]}
        for variant, transform in TRANSFORM_OF.items():
            s = steps[f"distill-{transform}"]
            cfg = replace(prof.student_train, loss="kd", transform=transform, coef=coefs[transform])
            model_dirs[variant] = timed(
                variant,
                stage_train,
                s["stage"],
                s["key"],
                student_src,
                tok,
                train_ex,
                cfg,
                acc,
                log,
                store_dir=store / "train",
            )
        if until == "distill":
            return {}

        results_by_test = {}
        for test_name, questions in data["tests"].items():
            variants, baselines, records = {}, {}, {}
            t0 = time.perf_counter()
            for variant in VARIANTS:
                top = prefix_top_layers(prof, variant)
                key = eval_key(prof, test_name, model_dirs[variant], precision, top)
                meta = stage_evaluate(key, key["model"], questions, prof, acc, log)
                variants[variant] = meta["metrics"]
                records[variant] = artefact_dir("evaluate", key)
            untuned = (("teacher_base", teacher_src), ("student_base", student_src))
            for base, src in untuned if prof.baselines else ():
                key = eval_key(prof, test_name, src, precision, prefix_top_layers(prof, base))
                meta = stage_evaluate(key, src, questions, prof, acc, log)
                baselines[base] = meta["metrics"]
                records[base] = artefact_dir("evaluate", key)
            timings[f"evaluate_{test_name}"] = round(time.perf_counter() - t0, 2)
            results_by_test[test_name] = {
                "n_test": len(questions),
                "variants": variants,
                "baselines": baselines,
                "records": {k: str(v / "records.jsonl") for k, v in records.items()},
            }

        store_meta = json.loads((store / "train" / "meta.json").read_text())
        first_test = test_tasks(setting)[0]
        results = {
            "profile": prof.name,
            "setting": setting,
            "note": prof.note,
            "precision": precision,
            "config": dataclasses.asdict(prof),
            "teacher": prof.teacher,
            "student": prof.student,
            "n_train": len(train_ex),
            "n_validation": len(val_ex),
            "n_test": results_by_test[first_test]["n_test"],
            "c_star": calib["c_star"],
            "delta": calib["delta"],
            "calibration": {
                k: calib[k]
                for k in ("c_star_ece", "delta_ece", "ece_renormalised_top1", "n_positions")
            },
            "store": {
                "k": store_meta["k"],
                "bytes_per_token": store_meta["bytes_per_position"],
                "mean_topk_mass": store_meta["mean_topk_mass"],
            },
            "variants": results_by_test[first_test]["variants"],
            "baselines": results_by_test[first_test]["baselines"],
            "by_test": results_by_test,
            "artefacts": {k: str(v) for k, v in {**model_dirs, "store": store}.items()},
        }
        if out is not None and acc.is_main_process:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            for name, obj in (("results.json", results), ("timings.json", timings)):
                # a kill never leaves half a file
                fsio.atomic_write_json(
                    folder / name, obj, indent=2, sort_keys=name == "results.json"
                )
            log(f"wrote {folder / 'results.json'}")
        return results

    # An upstream artefact found corrupt when a stage reads it is moved aside; starting over
    # recomputes it (finished, intact artefacts are skipped at the cost of a stat each).
    for attempt in itertools.count():
        try:
            return stages()
        except UpstreamCorrupt:
            if attempt >= len(steps) + 1:  # recomputed artefacts keep failing their checks
                raise
    raise AssertionError("unreachable")


def _start_clock(prof: Profile, setting: str, precision: str, data: dict, out, log) -> dict:
    """Estimate every stage before any runs, say the total, and keep the estimates of the stages
    this run computes in `out/clock.json` (earlier runs' estimates of finished stages stay), so
    the book can set estimate against actual."""
    from first_lib import clock

    rows = clock.estimate(prof, setting, precision, data=data)
    log(clock.describe(rows))
    if out is None:
        return {r["stage"]: {"seconds": r["seconds"], "basis": r["basis"]} for r in rows}
    path = Path(out) / "clock.json"
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
        except ValueError:
            previous = None  # a damaged record of estimates is not worth stopping a run for
    path.parent.mkdir(parents=True, exist_ok=True)
    return clock.write_clock(path, rows, previous)


# ----------------------------------------------------------------------------- CLI


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(PROFILES)} (default cpu)")
    p.add_argument("--setting", default="csqa", help=f"one of {', '.join(SETTINGS)} (default csqa)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a profile field, e.g. --set n_train=100 (repeatable)",
    )
    device.add_precision_argument(p)


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise FirstError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_run(args) -> int:
    overrides = _overrides(args.set)
    if args.precision is not None:  # the same as --set precision=...
        overrides["precision"] = args.precision
    if args.dry_run:
        prof = for_setting(get_profile(args.profile, **overrides), args.setting)
        print(describe_plan(prof, args.setting))
        return 0
    results = run(
        args.profile,
        args.setting,
        Path(args.out) if args.out else None,
        until=getattr(args, "until", None),
        **overrides,
    )
    if results and not args.out:
        print(json.dumps(results, indent=2))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("run", help="run every missing stage and write DIR/results.json")
    _common(p)
    p.add_argument("--out", help="folder for results.json (and timings.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; load nothing")
    p.set_defaults(func=_cmd_run)
    c = sub.add_parser(
        "clean",
        help="list (or with --yes delete) artefacts that no built-in profile of this version uses",
    )
    c.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    c.set_defaults(func=_cmd_clean)
    for stage in ("teacher", "extract", "calibrate", "finetune", "distill"):
        q = sub.add_parser(stage, help=f"run the pipeline up to the {stage} stage (cached)")
        _common(q)
        q.set_defaults(func=_cmd_run, until=stage, out=None, dry_run=False)
