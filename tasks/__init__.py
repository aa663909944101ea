"""Thin Prefect tasks: read inputs by URI, call one dpg function, persist records (Parquet), log to MLflow."""
