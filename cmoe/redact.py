"""Secrets out of messages: a URI's password (`scheme://user:pw@host`) never reaches logs or output."""

from __future__ import annotations

import re

# userinfo of a URL: everything between "//" and the last "@" before the host's path
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@\s]*)@")


def redact_uri(text: str | None) -> str:
    """`text` with the password of every URL in it replaced by ***, user name kept (for the reader)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text or "")
