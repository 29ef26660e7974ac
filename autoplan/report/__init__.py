"""Reports: tables now; markdown reports and plots with the benchmark work."""

from autoplan.report.tables import estimate_table

__all__ = ["estimate_table"]
