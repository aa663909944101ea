"""Storage: every path is an fsspec URL (a local folder, or s3://bucket/prefix through s3fs).

Layout of one run::

    <store>/<run_id>/config.json                       the run's config (resume compares it)
    <store>/<run_id>/iter-0003/<stage>/<digest>.parquet  data files named by their content digest
    <store>/<run_id>/iter-0003/<stage>/<digest>.<ext>    other artifacts (generator state, plots)
    <store>/<run_id>/iter-0003/<stage>/manifest.json     written last: the stage is complete

S3 has no atomic rename, so a stage counts as done only when its manifest exists, and a reader checks
every file against the digest the manifest names. Only this module converts records to Parquet.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from typing import Any

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from dpg.errors import DPGError

MANIFEST = "manifest.json"


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) for `url`; a copy of `storage_options` is passed (some libraries mutate it)."""
    try:
        return fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise DPGError(f"storage.url={url!r} cannot be opened ({e}); use a local folder or s3://bucket/prefix") from e


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    parent = path.rsplit("/", 1)[0]
    try:
        if isinstance(fs, LocalFileSystem):  # object stores have no folders; s3fs's makedirs creates missing buckets
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(data)
    except Exception as e:  # OSError, botocore's connection errors, ...: one line, the cause chained
        raise DPGError(f"cannot write {url} ({type(e).__name__}: {e}); check that the store is writable "
                       "and reachable, then resume the run") from e


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise
    except Exception as e:  # as in write_bytes
        raise DPGError(f"cannot read {url} ({type(e).__name__}: {e}); check that the store is reachable") from e


def table_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False, engine="pyarrow")
    return buffer.getvalue()


def write_stage(stage_url: str, files: dict[str, bytes | pd.DataFrame], meta: dict[str, Any],
                storage_options: dict | None = None) -> dict:
    """Write each file under its content digest, then the manifest: {"files": {name: entry}, "meta": meta}.

    `files` maps a logical name (e.g. "rollouts.parquet") to bytes or a DataFrame (stored as Parquet).
    """
    entries = {}
    for name, content in files.items():
        data = table_bytes(content) if isinstance(content, pd.DataFrame) else content
        ext = name.rsplit(".", 1)[-1] if "." in name else "bin"
        sha = digest(data)
        entry = {"file": f"{sha[:20]}.{ext}", "sha256": sha, "bytes": len(data)}
        if isinstance(content, pd.DataFrame):
            entry["rows"] = len(content)
        write_bytes(join(stage_url, entry["file"]), data, storage_options)
        entries[name] = entry
    manifest = {"files": entries, "meta": meta, "written_at": time.time()}
    write_bytes(join(stage_url, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode(), storage_options)
    return manifest


def read_manifest(stage_url: str, storage_options: dict | None = None) -> dict | None:
    """The stage's manifest, or None when the stage never completed."""
    try:
        return json.loads(read_bytes(join(stage_url, MANIFEST), storage_options))
    except FileNotFoundError:
        return None


def read_file(stage_url: str, name: str, storage_options: dict | None = None, manifest: dict | None = None) -> bytes:
    """A stage's file by logical name, checked against the manifest's digest."""
    manifest = manifest or read_manifest(stage_url, storage_options)
    if manifest is None or name not in manifest["files"]:
        raise DPGError(f"{stage_url} has no completed file {name!r}; rerun or resume the run to produce it")
    entry = manifest["files"][name]
    data = read_bytes(join(stage_url, entry["file"]), storage_options)
    if digest(data) != entry["sha256"]:
        raise DPGError(f"{join(stage_url, entry['file'])} does not match its manifest digest (corrupted or "
                       "overwritten); delete the stage's manifest.json and resume to recompute it")
    return data


def read_table(stage_url: str, name: str, storage_options: dict | None = None) -> pd.DataFrame:
    return pd.read_parquet(io.BytesIO(read_file(stage_url, name, storage_options)))


def verify_stage(stage_url: str, storage_options: dict | None = None) -> dict | None:
    """The manifest if the stage is complete and every file matches its digest, else None."""
    manifest = read_manifest(stage_url, storage_options)
    if manifest is None:
        return None
    try:
        for name in manifest["files"]:
            read_file(stage_url, name, storage_options, manifest)
    except (DPGError, FileNotFoundError):
        return None
    return manifest
