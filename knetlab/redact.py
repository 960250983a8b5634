"""Credentials out of text: the one `redact` used for configs (the YAML saved with every run and checkpoint), MLflow
params and tags, error messages and log lines.

What is replaced by `***`:
- the userinfo of a URI, user and password alike (`https://alice:pw@host` -> `https://***@host`; a user name can be
  an access key id or a token);
- `user:password@host` without a scheme, as an S3 client quotes a bucket name it was given (`'AKIA..:pw@bucket'`);
- the value of a secret-looking name (`X-Amz-Signature=..`, `password: ..`, `?token=..`, `AWS_SECRET_ACCESS_KEY=..`);
- AWS access key ids (`AKIA...`, `ASIA...`).
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
CREDENTIALS_BELONG = ("S3 credentials belong in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), an AWS "
                      "profile or the node's IAM role, never in a URI")

_URI_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s'\"]+@")  # to the host's last @
_BARE_USERINFO = re.compile(r"(?<![\w.:/*-])[^\s/@'\":]+:[^\s/@'\"]+@(?=[\w.-])")
_SECRET_NAME = r"[\w.-]*(?:secret|password|passwd|token|access_?key|credential|signature|api_?key)[\w.-]*"
_SECRET_ASSIGNMENT = re.compile(rf"(?i)(?P<name>{_SECRET_NAME})(?P<sep>\s*[=:]\s*)(?P<value>[^\s&,;'\"]+)")
# Query parameters whose names hold characters outside [\w.-] (e.g. percent-escapes) but still name a secret.
_SECRET_QUERY = re.compile(r"(?i)(?P<name>[?&][^=&#\s]*(?:secret|token|password|passwd|signature|credential|"
                           r"access_?key)[^=&#\s]*)=(?P<value>[^&#\s]*)")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(text: Any) -> str:
    """`text` (a URI, a message, a config value; anything else is made text first) without credentials; redacting
    twice gives the same text."""
    text = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    text = _BARE_USERINFO.sub(f"{REDACTED}@", text)
    text = _SECRET_ASSIGNMENT.sub(
        lambda m: m[0] if m["value"] == REDACTED else f"{m['name']}{m['sep']}{REDACTED}", text)
    text = _SECRET_QUERY.sub(lambda m: m[0] if m["value"] == REDACTED else f"{m['name']}={REDACTED}", text)
    return _AWS_KEY_ID.sub(REDACTED, text)


def has_userinfo(uri: str) -> bool:
    """Whether `uri` carries credentials before its host (`scheme://user[:password]@host/...`)."""
    return bool(_URI_USERINFO.match(str(uri).strip()))
