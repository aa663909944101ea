"""One writer per run: `<run>/lock.json`, created exclusively, with its owner, host, pid and a heartbeat.

Created with O_EXCL on a local folder and with a conditional put (`If-None-Match: *`) on S3, so of two runs
that start together exactly one gets it. The owner rewrites the heartbeat every HEARTBEAT_SECONDS and
deletes the lock when it ends (also on an error). A process killed with -9 leaves its lock behind: the
next run refuses, says whose lock it is, and takes it over with `force` only when the owner is dead (same
host and its pid gone, or no heartbeat for STALE_SECONDS).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from dpg.errors import DPGError
from tasks import io

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0


def lock_url(run_url: str) -> str:
    return io.join(run_url, "lock.json")


def read_lock(run_url: str, storage_options: dict | None = None) -> dict | None:
    try:
        return json.loads(io.read_bytes(lock_url(run_url), storage_options))
    except FileNotFoundError:
        return None
    except ValueError:  # a lock cut short: its writer died while writing it
        return {"owner": "unknown", "host": "unknown", "pid": -1, "heartbeat": 0.0}


def is_stale(lock: dict, now: float | None = None) -> bool:
    """The owner is dead: on this host its pid is gone, elsewhere its heartbeat is older than STALE_SECONDS."""
    if lock.get("host") == socket.gethostname() and isinstance(lock.get("pid"), int) and lock["pid"] > 0:
        try:
            os.kill(lock["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False
    return (now or time.time()) - float(lock.get("heartbeat", 0.0)) > STALE_SECONDS


@contextlib.contextmanager
def run_lock(run_url: str, storage_options: dict | None = None, force: bool = False):
    """Hold the run's lock for the body; DPGError naming the holder when another live process has it."""
    me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    body = lambda: json.dumps({**me, "heartbeat": time.time()}).encode()
    url = lock_url(run_url)
    if not io.create_exclusive(url, body(), storage_options):
        held = read_lock(run_url, storage_options) or {}
        age = time.time() - float(held.get("heartbeat", 0.0))
        who = f"pid {held.get('pid')} on {held.get('host')} (last heartbeat {age:.0f} s ago)"
        if not is_stale(held):
            raise DPGError(f"run at {run_url} is being written by {who}; one writer per run: wait for it to end, "
                           f"or stop it (its lock is {url})")
        if not force:
            raise DPGError(f"run at {run_url} holds the lock of {who}, which is no longer running (killed?); "
                           "rerun with --force to take the lock over and resume")
        io.write_bytes(url, body(), storage_options)  # taken over
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(DPGError):  # a missed heartbeat is retried; the run goes on
                io.write_bytes(url, body(), storage_options)

    thread = threading.Thread(target=beat, name="dpg-lock-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        held = read_lock(run_url, storage_options)
        if held is not None and held.get("owner") == me["owner"]:
            io.remove(url, storage_options)
