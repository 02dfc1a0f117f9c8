"""Experiments that compare teacher-training methods, as separate steps:

* :mod:`.grid`: plan the grid of teacher methods (and swept variants) x distillers x seeds x
  pairs and list its runs;
* :mod:`.runs`: execute one run in its directory (:mod:`.layout`; locked, :mod:`.lock`);
* :mod:`.schedule`: put the runs on a backend, one after another here or as Ray tasks
  (:mod:`.ray_backend`, needs ``pip install 'soteacher[ray]'``), with progress
  (:mod:`.progress`);
* :mod:`.report`: the results table and summary, and :mod:`.plots`: figures (needs matplotlib);
* :mod:`.premise`: the premise panel of every report (how well each teacher's distance to p*
  and each proxy of :mod:`.proxies` predicts its students' accuracy).
"""

from .grid import (ORACLE, Pair, Run, RunEntry, Variant, distiller_entries, model_pairs, plan_grid,
                   teacher_variants, validate_experiment)
from .report import (collect_rows, format_summary, mean_std, paired_differences, student_cells,
                     teacher_cells, write_report, write_results_csv)
from .premise import premise_table, write_premise
from .proxies import PROXIES, TRUTH, proxy_value
from .schedule import GridFailed, run_experiment

__all__ = ["GridFailed", "ORACLE", "PROXIES", "Pair", "Run", "RunEntry", "TRUTH", "Variant", "collect_rows",
           "distiller_entries", "format_summary", "mean_std", "model_pairs", "paired_differences",
           "plan_grid", "premise_table", "proxy_value", "run_experiment", "write_premise", "student_cells", "teacher_cells", "teacher_variants",
           "validate_experiment", "write_report", "write_results_csv"]
