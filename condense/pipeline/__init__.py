"""Orchestration: the run directory, the ordered stages and what is skipped, resumed or rerun."""
