"""Comparison tables and reports, built from what MLflow holds (never from worker memory)."""
