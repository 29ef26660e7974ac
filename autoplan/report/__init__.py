"""Reports: tables now; markdown reports and plots with the benchmark work."""

from autoplan.report.tables import comparison_table, estimate_table, plans_table, search_report

__all__ = ["comparison_table", "estimate_table", "plans_table", "search_report"]
