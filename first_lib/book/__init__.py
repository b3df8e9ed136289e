"""The book's shared helpers: what every chapter imports as `from first_lib import book`."""

# ruff: noqa: F401 (a face: every name is imported to be re-exported)
from first_lib.book.coverage import (
    _coverage_summary,
    case_study,
    load_fast_model,
    model_coverage,
    store_disk_use,
    topk_mass_by_example,
)
from first_lib.book.differences import (
    CONTRADICTED,
    INCONCLUSIVE,
    REPRODUCED,
    Difference,
    _sorted_candidates,
    bootstrap_mean,
    combine_verdicts,
    diff_text,
    first_to_finetune,
    first_vs_others,
    metric_value,
    paired_difference,
    rank_gaps,
    unpaired_difference,
    verdict,
)
from first_lib.book.labels import (
    STUDENT_VARIANTS,
    TABLE_ORDER,
    TEST_LABELS,
    VARIANT_LABELS,
    human_bytes,
    metrics_row,
    pct,
    pct_ci,
    signed,
    size_label,
    variant_label,
)
from first_lib.book.output import (
    _jsonable,
    book_cache_dir,
    cached_json,
    figure_png,
    glue_figure,
    glue_many,
    glue_md,
    glue_table,
    glue_text,
    precision_sentence,
    profile_banner,
    show_source,
    write_chapter_json,
)
from first_lib.book.paper import PAPER_LS_BOOLQ_LLAMA1, PAPER_STORAGE, PAPER_TABLE1_LLAMA2
from first_lib.book.records import (
    candidate_ranks,
    coefficient_spread,
    conf_correct,
    rankwise_from_ranks,
    store_probs_ranks,
)
from first_lib.book.rerun import (
    papermill_command,
    papermill_option,
    parameter_names,
    rerun_commands,
    rerun_header,
)
from first_lib.book.runs import (
    ALLOW_COMPUTE,
    STAGE_LABELS,
    compute_time,
    load_records,
    metrics_table,
    missing_work,
    records_of,
    run_setting,
    seed_held_out,
    seed_records,
    seeds_of,
    stage_costs,
    stage_folder,
    stage_seconds,
)
from first_lib.book.text import (
    PLAIN_TEXT,
    TextSource,
    clean_britannica,
    fetch_text_archive,
    plain_text,
    text_examples,
)
