"""How long one MLflow request may take before it fails: MLflow's HTTP timeout and retries, bounded.

MLflow's defaults (7 retries with back-off 2, 4, … 64 s, and 120 s per try) keep a command waiting
for minutes on a tracking server that is down. MLflow reads its settings from the environment at
every request and has no per-client option, so cmoe sets them for the whole process: from
`registry.request_timeout_s` / `request_retries` when a `Registry` opens, and from `cmoe doctor`'s
`--timeout` (no retries) for its checks. The retries (urllib3's `Retry`, on a refused or broken
connection, a read timeout and 429/5xx answers) are MLflow's back-off at the gate: no other layer
retries a registry call.
"""

from __future__ import annotations

import os
import re

from urllib3.util.retry import Retry

BACKOFF_FACTOR = 2  # MLflow's own: waits 0, 4, 8, 16 … s before the 1st, 2nd, 3rd, 4th … retry
BACKOFF_JITTER = 1.0  # MLflow's own: up to 1 s added to every non-zero wait
# MLflow's message for a request that got no answer (after its retries, or timed out), and its root cause
_NO_ANSWER = re.compile(r"Max retries exceeded|failed with timeout exception")
_CAUSE = re.compile(r"\[Errno -?\d+\] [^'\")]+|Connection refused|[Rr]ead timed out|timed out")
ENV = {"timeout": "MLFLOW_HTTP_REQUEST_TIMEOUT", "retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
       "factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "jitter": "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"}


def limit_requests(timeout_s: int, retries: int) -> None:
    """Make every MLflow request of this process wait at most `timeout_s` to connect and per read,
    and retry at most `retries` times (overriding MLflow's variables: the config is the one setting)."""
    values = {"timeout": timeout_s, "retries": retries, "factor": BACKOFF_FACTOR, "jitter": BACKOFF_JITTER}
    for key, value in values.items():
        os.environ[ENV[key]] = str(value)


def backoff_s(retries: int) -> float:
    """The longest total wait between the tries of one request (urllib3: none before the first retry)."""
    return sum(min(Retry.DEFAULT_BACKOFF_MAX, BACKOFF_FACTOR * 2 ** (n - 1) + BACKOFF_JITTER)
               for n in range(2, retries + 1))


def worst_case_s(timeout_s: int, retries: int) -> float:
    """The longest one request can take before it fails: every try times out, then back-off between them
    (a refused connection fails at once, so an unreachable server costs only `backoff_s`)."""
    return (retries + 1) * timeout_s + backoff_s(retries)


def no_answer(message: str, timeout_s: int, retries: int) -> str | None:
    """For MLflow's message of a request that never got an answer, one short line saying so and what was
    tried (its own names a variable cmoe overrides); None for any other failure."""
    if not _NO_ANSWER.search(message):
        return None
    cause = _CAUSE.search(message)
    tries = f"{retries + 1} tries" if retries else "1 try"
    return (f"no answer{f' ({cause.group(0).strip()})' if cause else ''} after {tries} of at most {timeout_s} s "
            "each (registry.request_retries, registry.request_timeout_s)")
