"""What `alol` prints on the terminal besides its results.

- Log lines without tracebacks: a failure is the one `alol: error: ...` line (Prefect logs a failed
  task and flow with the traceback, its internal services too; its task- and flow-run error lines,
  which repeat the same error, stay off the terminal and still reach the Prefect API).
- After Ctrl-C, nothing of Prefect's crash reports ("Crash detected!", "Finished in state Crashed"):
  `alol: interrupted` says it. A second Ctrl-C exits at once (what is left behind, a partial output
  folder or a stage lock, the next run removes).
- No "Exception ignored in ..." tracebacks at interpreter shutdown, and an exception in a background
  thread as one warning line.
- `--debug` / ALOL_DEBUG=1: everything, tracebacks included.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import psutil

log = logging.getLogger("alol.console")

INTERRUPTED_EXIT = 130
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ConsoleFilter(logging.Filter):
    """On the handlers that write to the terminal: strips tracebacks, and Prefect's reports after Ctrl-C."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.debug:
            return True
        if self.interrupted and record.name.startswith("prefect"):
            if record.name.startswith(_RUN_LOGGERS) or record.levelno < logging.WARNING:
                return False
        if record.name.startswith(_RUN_LOGGERS) and (record.levelno >= logging.ERROR or _reports_failure(record)):
            return False  # a failed stage: Prefect says it three more times; the `alol: error:` line says it once
        # The records are shared with handlers that run later for the same record (the terminal ones).
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def _reports_failure(record: logging.LogRecord) -> bool:
    return isinstance(record.msg, str) and record.getMessage().startswith("Finished in state Failed")


_FILTER = ConsoleFilter(debug=False)


def setup(debug: bool) -> None:
    """Log INFO and above to stderr through the filter, and note Ctrl-C (SIGINT) before raising KeyboardInterrupt."""
    _FILTER.debug = debug
    _FILTER.interrupted = False
    if debug:
        os.environ["ALOL_DEBUG"] = "1"  # read by the temporary server (its output) and by subprocesses
    root = logging.getLogger()
    if not any(_FILTER in h.filters for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_FILTER)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "httpcore", "botocore", "aiobotocore", "s3fs"):  # one line per API request (or client) otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGINT, _on_interrupt)
    if not debug:
        sys.unraisablehook = _quiet_unraisable
        threading.excepthook = _thread_failed


def seconds_since_start() -> float:
    """Seconds since this process started (its creation time: imports count)."""
    return time.time() - psutil.Process().create_time()


def _quiet_unraisable(unraisable) -> None:
    """Errors Python cannot raise (a finaliser at shutdown, e.g. of a closed event loop's transport)."""
    log.debug("ignored: %s in %r", unraisable.exc_value, unraisable.object)


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not SystemExit:
        log.warning("thread %s failed: %s: %s", args.thread.name if args.thread else "?", args.exc_type.__name__, args.exc_value)


def filter_terminal_handlers() -> None:
    """Put the filter on every stream handler of every logger (Prefect adds its own when imported)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            terminal = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if terminal and _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def _on_interrupt(signum: int, frame) -> None:
    if _FILTER.interrupted:
        print("alol: interrupted", file=sys.stderr, flush=True)
        os._exit(INTERRUPTED_EXIT)
    _FILTER.interrupted = True
    raise KeyboardInterrupt
