"""Ranges of the ``rigfm run`` options, shared by the CLI parser and the session's checks (no imports)."""

MAX_DURATION_S = 1e7
MAX_RATE_HZ = 10_000.0
MAX_LATENCY_COMP_MS = 50.0
MAX_TIMEOUT_MS = 10_000.0
