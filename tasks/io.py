"""Storage: every path is an fsspec URL (a local folder, or s3://bucket/prefix through s3fs).

Layout of one run::

    <store>/<run_id>/config.json                       the run's config (resume compares it)
    <store>/<run_id>/iter-0003/<stage>/<digest>.parquet  data files named by their content digest
    <store>/<run_id>/iter-0003/<stage>/<digest>.<ext>    other artifacts (generator state, plots)
    <store>/<run_id>/iter-0003/<stage>/manifest.json     written last: the stage is complete

A stage counts as done only when its manifest exists and parses, and a reader checks every file against
the digest the manifest names. Local files are written to a temporary name in the same folder and renamed
into place, so a kill or a full disk never leaves half a file under its real name; S3 has no rename, but
an object appears whole or not at all, and the manifest is written last. A manifest that does not parse
(written by an older, non-atomic writer, or edited) counts as "not done", with a warning.
Only this module converts records to Parquet.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from typing import Any

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem

from dpg.errors import DPGError

MANIFEST = "manifest.json"
log = logging.getLogger("dpg.store")


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
            temporary = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
            try:
                with open(temporary, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)  # atomic on POSIX: readers see the old file or the whole new one
            finally:
                if os.path.exists(temporary):
                    os.remove(temporary)
        else:
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


def create_exclusive(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Write `url` only if nothing is there yet; False if something is. Atomic on a local folder (O_EXCL) and
    on S3 (a conditional put, If-None-Match: *); on other stores a check, then a write."""
    fs, path = filesystem(url, storage_options)
    try:
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if "s3" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            return _s3_put_if_absent(path, data, storage_options or {})
        if fs.exists(path):
            return False
        with fs.open(path, "wb") as f:
            f.write(data)
        return True
    except Exception as e:  # as in write_bytes
        raise DPGError(f"cannot write {url} ({type(e).__name__}: {e}); check that the store is writable "
                       "and reachable") from e


def _s3_put_if_absent(path: str, data: bytes, storage_options: dict) -> bool:
    """A conditional PutObject through botocore (every s3fs version rests on it), credentials from the environment."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import ClientError

    kwargs = {k: v for k, v in storage_options.get("client_kwargs", {}).items() if k in ("endpoint_url", "region_name")}
    client = botocore.session.get_session().create_client("s3", config=Config(**storage_options.get(
        "config_kwargs", {})), **kwargs)
    bucket, _, key = path.partition("/")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    try:
        fs.rm(path)
    except FileNotFoundError:
        pass
    except Exception as e:  # as in write_bytes
        raise DPGError(f"cannot remove {url} ({type(e).__name__}: {e}); check that the store is writable") from e


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.exists(path)
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
    """The stage's manifest, or None when the stage never completed (or its manifest does not parse: warned)."""
    try:
        manifest = json.loads(read_bytes(join(stage_url, MANIFEST), storage_options))
    except FileNotFoundError:
        return None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a partial or damaged manifest
        log.warning("%s is unreadable (%s): the stage counts as not done and will be recomputed",
                    join(stage_url, MANIFEST), e)
        return None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("meta"), dict)):
        log.warning("%s is not a stage manifest: the stage counts as not done and will be recomputed",
                    join(stage_url, MANIFEST))
        return None
    return manifest


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
