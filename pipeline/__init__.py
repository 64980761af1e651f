"""Orchestration of alol: storage, the stage runner, the Prefect flow, the CLI and SQL."""

import os

# Stage modules log to "alol.*"; forward those records to Prefect's run logs. No telemetry offline.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "alol")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# On a loaded 2-core machine the temporary server can take longer than Prefect's default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
# `alol compare` logs between flow runs; those records stay local instead of warning about a missing flow run.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
