"""What `dpg run` / `dpg resume` print: a calm console, everything else in a log file.

- `route_logs(path, verbosity)`: Prefect's console handlers are replaced by a log file (every library's
  INFO and up, Python warnings included) and one console handler. On the console: dpg's own warnings,
  one line each; `-v` adds INFO lines and other libraries' warnings; `--debug` everything, tracebacks too.
  Errors are not printed there: the command ends with one `dpg: error:` line (flows.cli.main).
- `progress(cfg)`: a context manager that watches the run's store from a thread and shows where the run
  is: iteration k/n, the stage in progress, elapsed, ETA, the last Phi and human metric. On a terminal it is
  a live line (rich); elsewhere (CI, pipes) one plain line per finished iteration.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from dpg.audit import human_metric

OWN = ("dpg", "prefect.flow_runs", "prefect.task_runs")  # get_run_logger() in tasks/ logs to the latter two


class ConsoleFilter(logging.Filter):
    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity >= 2:
            return True
        if record.levelno >= logging.ERROR:  # the error ends the command as its last line
            return False
        own = record.name.split(".")[0] == "dpg" or record.name in OWN
        if self.verbosity == 1:
            return record.levelno >= logging.INFO and (own or record.levelno >= logging.WARNING)
        return own and record.levelno >= logging.WARNING


class FirstLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "warning" if record.levelno == logging.WARNING else record.levelname.lower()
        return f"dpg: {level}: {record.getMessage().splitlines()[0] if record.getMessage() else ''}"


def route_logs(path: str, verbosity: int = 0, console=None) -> logging.Handler:
    """Send every log record to the file at `path`, and only what `ConsoleFilter` lets through to stderr."""
    import os

    import mlflow  # noqa: F401 (configures its loggers on import: before the swap below)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    file = logging.FileHandler(path, encoding="utf-8")
    file.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if console is not None:
        from rich.logging import RichHandler

        screen: logging.Handler = RichHandler(console=console, show_time=False, show_path=False, show_level=False,
                                              markup=False, rich_tracebacks=False)
    else:
        screen = logging.StreamHandler(sys.stderr)
    screen.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 else logging.WARNING)
    screen.addFilter(ConsoleFilter(verbosity))
    screen.setFormatter(FirstLine() if verbosity < 2 else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger()] + [v for v in logging.root.manager.loggerDict.values()
                                       if isinstance(v, logging.Logger)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(handler, "dpg", False) or _to_screen(handler):
                logger.removeHandler(handler)
                if not logger.propagate and not getattr(handler, "dpg", False):  # e.g. uvicorn: no root handler
                    logger.addHandler(file)
    file.dpg = screen.dpg = True  # replaced, not stacked, when this process routes its logs again
    root = logging.getLogger()
    noisy = ("transformers", "mlflow", "alembic", "urllib3", "botocore", "s3fs", "fsspec", "httpx")
    if not ROUTED:
        ROUTED.update(root=root.level, **{name: logging.getLogger(name).level for name in noisy})
    root.addHandler(file)
    root.addHandler(screen)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    logging.captureWarnings(True)  # library warnings go to the file (py.warnings), not the console
    if verbosity < 2:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    for name in noisy:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    return file


ROUTED: dict = {}  # the levels route_logs changed, for unroute_logs


def unroute_logs() -> None:
    """Undo route_logs when the command ends, so a caller of flows.cli.main in its own process (tests, notebooks)
    gets its logging back: dpg's handlers closed and removed, the levels it changed restored."""
    root = logging.getLogger()
    for logger in [root] + [v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger)]:
        for handler in list(logger.handlers):
            if getattr(handler, "dpg", False):
                logger.removeHandler(handler)
                handler.close()
    for name, level in ROUTED.items():
        (root if name == "root" else logging.getLogger(name)).setLevel(level)
    ROUTED.clear()
    logging.captureWarnings(False)


def _to_screen(handler: logging.Handler) -> bool:
    """Prefect's console handler, MLflow's, or any handler writing to the process's stdout/stderr."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if isinstance(handler, PrefectConsoleHandler):
        return True
    stream = getattr(handler, "stream", None)
    return type(handler) is logging.StreamHandler and (
        stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
        or type(stream).__module__.startswith("mlflow"))


def snapshot(cfg, first: int = 0) -> dict:
    """Where the run is, from the manifests alone (cheap enough to poll): finished iterations, the stage in
    progress, the last report's metrics."""
    from tasks import io
    from tasks.stages import stage_names, stage_url

    options, names = cfg.storage.storage_options, stage_names(cfg)
    it, metrics = first, {}
    while it < cfg.outer_iterations:
        report = io.read_manifest(stage_url(cfg, it, "report"), options)
        if report is None:
            break
        metrics, it = report["meta"].get("metrics", {}), it + 1
    stage = next((n for n in names if io.read_manifest(stage_url(cfg, it, n), options) is None), names[-1]) \
        if it < cfg.outer_iterations else "done"
    return {"finished": it, "stage": stage, "metrics": metrics}


def describe(cfg, snap: dict, started: float, finished_at_start: int) -> str:
    elapsed = time.time() - started
    done_here = snap["finished"] - finished_at_start
    remaining = cfg.outer_iterations - snap["finished"]
    eta = f"{elapsed / done_here * remaining:.0f} s" if done_here and remaining else "?" if remaining else "0 s"
    m = snap["metrics"]
    human = human_metric(m)
    current = min(snap["finished"] + 1, cfg.outer_iterations)
    parts = [f"iteration {current}/{cfg.outer_iterations}" if remaining else
             f"{cfg.outer_iterations}/{cfg.outer_iterations} iterations done",
             f"stage {snap['stage']}" if remaining else "", f"elapsed {elapsed:.0f} s", f"ETA {eta}" if remaining
             else "", f"Phi {m['eval_phi']:.4g}" if "eval_phi" in m else "",
             f"{human[0]} {human[1]:.3g}" if human else ""]
    return " | ".join(p for p in parts if p)


@contextlib.contextmanager
def progress(cfg, console=None, interval: float = 1.0):
    """Show the run's progress while the body runs (see the module docstring)."""
    from tasks.stages import completed_iterations

    started = time.time()
    first = completed_iterations.fn(cfg)
    stop = threading.Event()
    live = None
    if console is not None and console.is_terminal:
        from rich.live import Live

        live = Live("", console=console, refresh_per_second=4, transient=False)
        live.start()

    reported = {"finished": first}

    def show() -> None:
        try:
            snap = snapshot(cfg, first)
        except Exception:  # the store hiccuped: the run itself reports real errors
            return
        if live is not None:
            live.update(f"[bold]{cfg.run_id}[/bold] {describe(cfg, snap, started, first)}")
        elif snap["finished"] > reported["finished"]:
            reported["finished"] = snap["finished"]
            print(f"dpg: {describe(cfg, snap, started, first)}", file=sys.stderr, flush=True)

    def watch() -> None:
        while not stop.wait(interval):
            show()

    thread = threading.Thread(target=watch, name="dpg-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()
        if live is not None:
            live.stop()
