"""The stages as functions: each computes one artefact (a trained model, a top-k store, the
calibration coefficients, an evaluation) unless it is already done, under its lock, and writes
its `meta.json` last. Training resumes from its checkpoint, extraction from its last shard.
Named crash points (`fsio.crash_point`, `$FIRST_CRASH_AT`) sit in every commit window; see
`scripts/crash_trial.py`."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import numpy as np

from first_lib import device, fsio
from first_lib.artefacts import (
    artefact_dir,
    artefact_lock,
    claim_done,
    is_done,
    read_meta,
    verify_upstream,
    write_meta,
)
from first_lib.config import Profile, TrainConfig
from first_lib.pipeline.data import corpus_text
from first_lib.pipeline.graph import prefix_top_layers, tiny_key


def accelerator(precision: str):
    """The process's `Accelerator` at `precision` (see `first_lib.device.accelerator`)."""
    return device.accelerator(precision)


def model_dtype(precision: str):
    """Weights of loaded models: bf16 at bf16, fp32 at fp32."""
    return device.torch_dtype(precision)


def _prefix_root():
    """Where frozen bottoms are cached (`first_lib.prefix`; imported here, with torch)."""
    from first_lib import prefix

    return prefix.cache_root()


def _prefix_entries() -> set[str]:
    """Names of the finished entries of the frozen-bottom cache (`first_lib.prefix`)."""
    root = _prefix_root()
    if not root.is_dir():
        return set()
    return {d.name for d in root.iterdir() if (d / "meta.json").is_file()}


def count_prefix_builds(tally, before: set[str]) -> int:
    """Add to `tally` the forward passes that built the cache entries finished since `before`
    (`_prefix_entries()` taken when the stage began): an evaluation builds its bottom states
    inside its clocked seconds, so without them its FLOPs fall short of its time. Each entry's
    key gives the layers it ran and its states file the sequences' lengths; the batches are
    re-formed as `prefix.bottom_states` forms them (longest first), so padding counts too.
    Returns the entries counted. An entry another process finished meanwhile would count too:
    the stages of one run do not overlap."""
    from safetensors import safe_open

    from first_lib import prefix

    new = sorted(_prefix_entries() - before)
    for name in new:
        folder = _prefix_root() / name
        layers = int(read_meta(folder)["key"]["layers"][1])
        with safe_open(str(folder / prefix.STATES_FILE), framework="pt") as f:
            lengths = sorted(f.get_tensor("lengths").tolist(), reverse=True)
        for lo in range(0, len(lengths), prefix.BATCH_SIZE):
            batch = lengths[lo : lo + prefix.BATCH_SIZE]
            tally.forward(batch, len(batch) * batch[0], head_rows=0, layers=layers)
    return len(new)


def _barrier(acc) -> None:
    if acc.num_processes > 1:
        acc.wait_for_everyone()


# ----------------------------------------------------------------------------- models


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
                seed=prof.data_seed,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            model.save_pretrained(out / role, safe_serialization=True)
            tok.save_pretrained(out / role)
        fsio.crash_point("tiny-models:files-written")
        write_meta(out, {"stage": "tiny-models", "key": key, "note": prof.note})
    _barrier(acc)
    return out


def _load(source: str, acc):
    from first_lib import models

    return models.load_model(
        source, dtype=model_dtype(device.accelerator_precision(acc)), device=acc.device
    )


def _save_model(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------- the stages


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
            prefix_cache=_prefix_root(),
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
                prefix_cache=_prefix_root(),
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


def _model_meta(stage: str, key: dict, precision: str, t0: float, tally, acc, **result) -> dict:
    """The meta.json of a stage that ran a model: its result, precision, wall time since `t0`
    and the `perf` of its `flops.Tally`."""
    perf = tally.record(precision, acc.device.type)
    wall = time.perf_counter() - t0
    return {"stage": stage, "key": key, **result, "precision": precision, "wall_seconds": wall,
            "perf": perf}  # fmt: skip


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
                    seed=prof.data_seed,
                    autocast=precision == "bf16",
                    top_layers=key["top_layers"],
                )
                tally = flops.Tally(flops.shape_of_config(model.config))
                before = _prefix_entries()
                _, summary = evaluate.run_evaluation(
                    config,
                    model,
                    tok,
                    questions,
                    out,
                    tally=tally,
                    prefix_cache=_prefix_root(),
                    log=log,
                )
                count_prefix_builds(tally, before)
                fsio.crash_point("evaluate:records-written")
                write_meta(
                    out, _model_meta("evaluate", key, precision, t0, tally, acc, metrics=summary)
                )
    _barrier(acc)
    return read_meta(out)


def stage_posthoc(key: dict, test_dir: Path, val_dir: Path, prof: Profile, log) -> dict:
    """Post-hoc temperature scaling (`first_lib.posthoc`): a temperature fitted on the model's
    validation records, applied to its test records; no model is loaded."""
    from first_lib import evaluate, posthoc

    out = artefact_dir("posthoc-ts", key)
    if is_done(out, key):
        return read_meta(out)
    with artefact_lock(out, log=log):
        if claim_done(out, key, log):
            return read_meta(out)
        verify_upstream(test_dir, log)
        verify_upstream(val_dir, log)
        out.mkdir(parents=True, exist_ok=True)
        val = evaluate.load_records(val_dir / "records.jsonl")
        temperature = posthoc.fit_temperature(val)
        records = posthoc.apply_temperature(
            evaluate.load_records(test_dir / "records.jsonl"), temperature
        )
        summary = evaluate.summarize(records, n_boot=prof.n_boot, seed=prof.data_seed)
        evaluate.save_records(records, out / "records.jsonl")
        log(f"posthoc-ts: T = {temperature:.3f} from {len(val)} validation questions")
        meta = {"stage": "posthoc-ts", "key": key, "temperature": temperature, "metrics": summary}
        # at the grid's end: the fit wanted a more extreme T (a model that knows nothing)
        meta["at_grid_edge"] = bool(
            np.isclose(np.log(temperature), posthoc.LOG_T_GRID[[0, -1]]).any()
        )
        meta.update(n_validation=len(val), validation_nll=posthoc.nll(val, temperature))
        write_meta(out, meta)
    return read_meta(out)


def stage_check(
    name: str,
    key: dict,
    model_dir: Path,
    source: str,
    examples: list[dict],
    cfg: TrainConfig,
    pad_id: int,
    prof: Profile,
    acc,
    log,
    store_dir: Path | None = None,
) -> dict:
    """Did the model at `model_dir` learn? Its training objective (`cfg`, on the store at
    `store_dir` for KD) on each held-out example, and that of the untuned `source` it started
    from (`first_lib.heldout`); the meta holds both, paired by example."""
    from first_lib import flops, heldout

    out = artefact_dir(name, key)
    if not is_done(out, key) and acc.is_main_process:
        with artefact_lock(out, log=log):
            if not claim_done(out, key, log):
                verify_upstream(model_dir, log, acc)
                teacher = None
                if store_dir is not None:
                    from first_lib.knowledge import TopKStore

                    verify_upstream(store_dir, log, acc)
                    store = TopKStore(store_dir)
                    store.check_alignment(examples)
                    teacher = store.example
                out.mkdir(parents=True, exist_ok=True)
                precision = device.accelerator_precision(acc)
                log(f"{name}: the training loss of {model_dir} and of {source} on "
                    f"{len(examples)} held-out examples")  # fmt: skip
                t0, tally, passes = time.perf_counter(), None, {}
                for which, path in (("tuned", str(model_dir)), ("untuned", source)):
                    model = _load(path, acc)
                    tally = tally or flops.Tally(flops.shape_of_config(model.config))
                    loss, targets = heldout.example_losses(
                        model, examples, cfg, pad_id, teacher, prof.eval_batch,
                        autocast=precision == "bf16", tally=tally,
                    )  # fmt: skip
                    passes[which] = {"ids": [e["id"] for e in examples], "loss": loss,
                                     "targets": targets}  # fmt: skip
                    del model
                record = heldout.compare_models(passes["tuned"], passes["untuned"])
                log(f"{name}: held-out loss {np.mean(record['untuned']):.4f} untuned -> "
                    f"{np.mean(record['tuned']):.4f} tuned")  # fmt: skip
                write_meta(out, _model_meta(name, key, precision, t0, tally, acc, held_out=record))
    _barrier(acc)
    return read_meta(out)
