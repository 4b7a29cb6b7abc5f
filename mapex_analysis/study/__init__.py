"""Studies: the validated YAML schema, the resumable runner and the tidy results table."""

from mapex_analysis.study.results import COLUMNS, read_results
from mapex_analysis.study.runner import Cell, RunSummary, Variant, plan_grid, run_study
from mapex_analysis.study.schema import Study, StudyError, load_study, parse_study

__all__ = [
    "COLUMNS",
    "Cell",
    "RunSummary",
    "Study",
    "StudyError",
    "Variant",
    "load_study",
    "parse_study",
    "plan_grid",
    "read_results",
    "run_study",
]
