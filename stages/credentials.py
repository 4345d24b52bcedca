"""Credentials never leave the process: masked in what is written (job.yaml), refused in URIs, scrubbed from
what is printed."""

from __future__ import annotations

import re

MASK = "***"
# A storage option whose key holds one of these words is a credential (its whole value is masked).
SECRET_WORDS = ("key", "secret", "token", "password", "passphrase", "credential", "connection", "header", "auth",
                "cookie", "signature", "sas", "private", "session")
# user:password@ in a URI (abfs://container@account has no password and is no credential).
_USER_INFO = re.compile(r"(?P<scheme>\b[a-zA-Z][\w+.-]*://)[^/@\s:]*:[^/@\s]*@")
_KNOWN: set[str] = set()  # credential values seen in this process, scrubbed from printed text


def is_secret_key(key) -> bool:
    """Whether a storage option's key names a credential."""
    return any(word in str(key).lower() for word in SECRET_WORDS)


def has_user_info(uri: str) -> bool:
    """Whether a URI carries user:password@."""
    return bool(_USER_INFO.search(uri))


def masked(options):
    """Storage options with every credential replaced by MASK (and user:password@ cut from URLs in them)."""
    if isinstance(options, dict):
        return {k: MASK if is_secret_key(k) else masked(v) for k, v in options.items()}
    if isinstance(options, list):
        return [masked(v) for v in options]
    return _USER_INFO.sub(rf"\g<scheme>{MASK}@", options) if isinstance(options, str) else options


def usable(options):
    """Storage options read back from a job.yaml with the masked entries left out: credentials then come from
    the command line or the environment, never from MASK."""
    if isinstance(options, dict):
        return {k: usable(v) for k, v in options.items() if v != MASK}
    return options


def remember(options) -> None:
    """Note the credential values of storage options, so that `redact` scrubs them from any printed text."""
    if isinstance(options, dict):
        for key, value in options.items():
            if is_secret_key(key):
                _KNOWN.update(v for v in _strings(value) if len(v) >= 4)
            else:
                remember(value)
    elif isinstance(options, list):
        for value in options:
            remember(value)


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif value is not None:
        yield str(value)


MAPPING_OPTIONS = ("client_kwargs", "config_kwargs", "s3_additional_kwargs")  # s3fs unpacks them with **


def misshapen(options: dict) -> str | None:
    """The first storage option that s3fs unpacks as a mapping but is not one (`client_kwargs: http://…`, the
    endpoint written without its key), or None; an empty one is no options, as s3fs reads it."""
    return next((key for key in MAPPING_OPTIONS if options.get(key) and not isinstance(options[key], dict)), None)


def options_arg(text: str) -> dict:
    """argparse type of --storage-options: a JSON object; an error never echoes the value (argparse would)."""
    import argparse
    import json

    try:
        options = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg} at character {err.pos}; the value is not "
                                         f"shown: it may hold credentials)") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of fsspec options")
    if key := misshapen(options):
        raise argparse.ArgumentTypeError(f"{key}: expected a JSON object of options (as in {{\"client_kwargs\": "
                                         f"{{\"endpoint_url\": …}}}}); the value is not shown: it may hold credentials")
    remember(options)
    return options


def redact(text: str) -> str:
    """`text` without URI user:password@ and without any credential value this process has seen."""
    text = _USER_INFO.sub(rf"\g<scheme>{MASK}@", str(text))
    for secret in sorted(_KNOWN, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
