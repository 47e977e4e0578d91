"""Keeping credentials out of everything we print, log or store.

Credentials reach the job from the AWS environment variables or from `--storage-options`; third-party
libraries may echo them in configs and error messages. `redact` masks a config (secret-looking keys and
URL user:password parts), `secret_values` collects the secret strings themselves, and `scrub` removes
them from free text. Over-redaction (a "sort_key") is acceptable; a leaked credential is not.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

REDACTED = "***"

# Environment variables whose values are secrets: scrubbed from every message we build.
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")

_SECRET_KEY = re.compile(r"key|secret|token|passw|credential|session", re.IGNORECASE)
# user:password@ inside a URL such as https://user:pw@host/...
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
# A URI's user-info: from "scheme://" to the last "@" of the authority, which ends at the first / ? or #.
_AUTHORITY_USERINFO = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
MIN_SECRET_LENGTH = 4  # shorter "secrets" would garble ordinary words when replaced


def redact(obj: Any) -> Any:
    """A copy of a config (nested dicts, lists, tuples) safe to log or write to a report.

    Values under any key that looks secret (key, secret, token, password, credential, session —
    case-insensitive, anywhere in the name) become "***", however deeply nested; the user:password
    part of URLs in string values is hidden too. Over-redaction (e.g. a "sort_key") is acceptable;
    a leaked credential is not.
    """
    if isinstance(obj, dict):
        return {k: REDACTED if _SECRET_KEY.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return _URL_USERINFO.sub(REDACTED + "@", obj)
    return obj


def has_userinfo(uri: str) -> bool:
    """Whether `uri` names a user in its authority: `s3://user:pass@host/key`, `s3://user@host`.

    Only the authority counts (between "://" and the next "/", "?" or "#"): the "@" of
    `s3://bucket/key@2x.jpg` is part of the key, and a plain path (no scheme) has no user-info.
    """
    return _AUTHORITY_USERINFO.match(uri) is not None


def without_userinfo(uri: str) -> str:
    """`uri` with its user-info replaced by "***" (`s3://***@host/key`); any other URI as it is."""
    return _AUTHORITY_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", uri, count=1)


def env_secrets() -> list[str]:
    """The values of the SECRET_ENV_VARS that are set: a library may quote them in its messages."""
    return [os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)]


def secret_values(options: Mapping[str, Any] | None = None) -> list[str]:
    """Every secret string we know of: values that `redact` hides in `options`, and AWS variables.

    Used to scrub error messages of third-party libraries before they become rows or log lines.
    """
    found: list[str] = []

    def walk(original: Any, hidden: bool) -> None:
        """Collect the strings under a secret-looking key, however deep."""
        if isinstance(original, dict):
            masked = redact(original)
            for key, value in original.items():
                walk(value, hidden or (masked[key] == REDACTED and value != REDACTED))
        elif isinstance(original, list | tuple):
            for value in original:
                walk(value, hidden)
        elif hidden and isinstance(original, str) and original:
            found.append(original)

    if options:
        walk(dict(options), False)
    found.extend(env_secrets())
    return sorted(set(found), key=len, reverse=True)  # longest first: a secret containing another


def scrub(text: str, secrets: Sequence[str]) -> str:
    """`text` with every secret replaced by "***" (and URL user:password parts hidden).

    `secrets` are replaced in the order given: pass the longest first (as `secret_values` returns them),
    so a secret that contains another is hidden whole.
    """
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LENGTH:
            text = text.replace(secret, REDACTED)
    return redact(text)
