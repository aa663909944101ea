"""Thin Prefect tasks: read inputs by URI, call one dpg function, persist records (Parquet via fsspec), log to MLflow."""
