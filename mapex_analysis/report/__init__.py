"""The study report: figures and the self-contained HTML page, from the results table only."""

from mapex_analysis.report.html import latest_study_dir, modality_findings, render_report

__all__ = ["latest_study_dir", "modality_findings", "render_report"]
