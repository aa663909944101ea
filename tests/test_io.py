"""Storage: content-addressed files + a manifest written last, on a local folder and on a real S3 API."""

import json

import pandas as pd
import pytest

from dpg.errors import DPGError
from tasks import io


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    options = request.getfixturevalue("s3_server")
    return f"s3://dpg-test/{tmp_path.name}", options


def test_stage_round_trip_is_verified_by_digest(store):
    url, options = store
    stage = io.join(url, "run-1", "iter-0000", "rollouts")
    frame = pd.DataFrame({"example_id": ["0-0-0", "0-0-1"], "tau": [1.5e-9, -2.0e-9]})
    assert io.read_manifest(stage, options) is None  # not complete yet
    manifest = io.write_stage(stage, {"rollouts.parquet": frame, "notes.json": b"{}"}, {"rows": 2}, options)
    assert manifest["files"]["rollouts.parquet"]["rows"] == 2
    pd.testing.assert_frame_equal(io.read_table(stage, "rollouts.parquet", options), frame)
    assert io.verify_stage(stage, options)["meta"] == {"rows": 2}
    # same content -> same file name: a rerun writes nothing new
    again = io.write_stage(stage, {"rollouts.parquet": frame, "notes.json": b"{}"}, {"rows": 2}, options)
    assert again["files"] == manifest["files"]


def test_corrupted_file_fails_verification_and_reads_loudly(tmp_path):
    stage = str(tmp_path / "stage")
    io.write_stage(stage, {"rewards.parquet": pd.DataFrame({"tau": [1.0]})}, {})
    name = json.loads((tmp_path / "stage" / "manifest.json").read_text())["files"]["rewards.parquet"]["file"]
    (tmp_path / "stage" / name).write_bytes(b"garbage")
    assert io.verify_stage(stage) is None
    with pytest.raises(DPGError, match="does not match its manifest digest"):
        io.read_table(stage, "rewards.parquet")


def test_unwritable_store_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")  # tests run as root here, so chmod would not stop a write
    with pytest.raises(DPGError, match="check that the store is writable"):
        io.write_stage(str(tmp_path / "file" / "stage"), {"a.json": b"{}"}, {})


def test_unreachable_s3_endpoint_is_one_clear_error():
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "k", "secret": "s",
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(DPGError, match=r"cannot write s3://nowhere/x/\w+\.json \(EndpointConnectionError"):
        io.write_stage("s3://nowhere/x", {"a.json": b"{}"}, {}, options)
