"""Prefect flows: the outer-iteration flow and the long-running optimization flow (composition only)."""
