"""`first bench`: does this code deliver the cost that offline top-k distillation promises?"""

# ruff: noqa: F401 - the package's face: re-exports only
from first_lib.bench.cli import add_cli
from first_lib.bench.coefficient import measure_coefficient_search
from first_lib.bench.config import (
    FULL_CPU_RAM_GB,
    ONLINE_IMPLS,
    PREFIX_LAYERS,
    REPO,
    TARGETS,
    BenchConfig,
    preset,
)
from first_lib.bench.context import chapter_timings, machine_info, summarize_timings
from first_lib.bench.disk import measure_store_bytes, write_jsonl_topk
from first_lib.bench.extraction import measure_extraction
from first_lib.bench.memory import measure_memory, memory_worker
from first_lib.bench.models import CONFIG_DIR, DERIVED, build_model, make_examples, model_config
from first_lib.bench.online import online_step_equivalent, online_step_lean, trl_available
from first_lib.bench.prefix_reuse import measure_prefix_reuse
from first_lib.bench.report import default_out, format_table, write_json
from first_lib.bench.run import check_targets, run_bench
from first_lib.bench.training import measure_training
