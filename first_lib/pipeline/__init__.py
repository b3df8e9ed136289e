"""The method's stages as one graph of cached artefacts: `graph` (what a run makes, declared once),
`stages` (how each is computed), `runner` (`first run`), `stale` (`first clean`), `clock` (how long), `cli`."""

# ruff: noqa: F401 - the package's face: it only hands names on
from first_lib.artefacts import (
    UpstreamCorrupt,
    artefact_dir,
    artefact_lock,
    code_version,
    config_hash,
    is_done,
    module_hash,
    read_meta,
    source_hash,
    write_meta,
)
from first_lib.pipeline.cli import add_cli, describe_plan
from first_lib.pipeline.data import load_questions, test_tasks, tokenize
from first_lib.pipeline.graph import (
    BASELINES,
    MODELS,
    POSTHOC,
    STUDENT_VARIANTS,
    TRANSFORM_OF,
    VARIANTS,
    eval_key,
    evaluations,
    missing,
    model_source,
    plan,
    prefix_top_layers,
    run_artefacts,
    run_precision,
    stage_graph,
    tiny_key,
)
from first_lib.pipeline.runner import run, run_seeds
from first_lib.pipeline.stages import calibration_data
from first_lib.pipeline.stale import clean, in_use, live_artefacts, names_in_use
