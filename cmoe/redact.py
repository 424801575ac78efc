"""Secrets out of everything cmoe prints, logs or writes: one redaction for messages, params and files.

Two kinds of secret reach text: a URI's password (`scheme://user:pw@host`, e.g. a tracking URI
with database or server credentials) and the values of the credential environment variables
(`SECRET_ENV`) that boto3, MLflow and Prefect read, which can surface in their error messages or
in a dump of the environment (`NAME=value`).
"""

from __future__ import annotations

import os
import re

# The credentials cmoe's services read from the environment: S3 (boto3), MLflow, Prefect.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
              "MLFLOW_TRACKING_TOKEN", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
# Shorter values are left alone: replacing them everywhere would mangle ordinary words (moto's
# dummy key "testing"), and no real key or token is that short.
_MIN_SECRET = 8
_STARS = "***"
# userinfo of a URL: everything between "//" and the last "@" before the host's path
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")
# NAME=value / NAME: value of a credential variable (an environment or config dump)
_ASSIGNED = re.compile(rf"\b(?P<name>{'|'.join(SECRET_ENV)})(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)[^\s'\",;]+")


def redact_uri(text: str | None) -> str:
    """`text` with every secret in it replaced by ***: each URL's password (user name kept, for the
    reader), each `NAME=value` of a credential variable, and the current value of each credential
    environment variable wherever it appears."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{_STARS}@", text or "")
    text = _ASSIGNED.sub(lambda m: f"{m['name']}{m['sep']}{m['quote']}{_STARS}", text)
    for name in SECRET_ENV:
        if len(value := os.environ.get(name, "")) >= _MIN_SECRET:
            text = text.replace(value, _STARS)
    return text
