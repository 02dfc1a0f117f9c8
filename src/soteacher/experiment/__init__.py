"""Experiments that compare teacher-training methods: a grid of teacher methods (and swept
variants) x distillers x seeds x teacher/student pairs (:mod:`.grid`), its results table and
summary (:mod:`.report`) and figures (:mod:`.plots`, needs matplotlib)."""

from .grid import (Pair, RunEntry, Variant, distiller_entries, model_pairs, run_experiment,
                   teacher_variants, validate_experiment)
from .report import (collect_rows, format_summary, mean_std, paired_differences, student_cells,
                     teacher_cells, write_report, write_results_csv)

__all__ = ["Pair", "RunEntry", "Variant", "collect_rows", "distiller_entries", "format_summary",
           "mean_std", "model_pairs", "paired_differences", "run_experiment", "student_cells",
           "teacher_cells", "teacher_variants", "validate_experiment", "write_report",
           "write_results_csv"]
