"""One place that keeps secrets in: everything that leaves the server passes through it.

An upstream can echo the key it was given ("Incorrect API key provided: sk-…") in an
error event, a close reason or even a transcript, and the bridge would otherwise
copy that to the page, the log and HTTP bodies. `Redactor` replaces the secrets it
was configured with (the upstream key, the bridge token), in plain and JSON-escaped
form, and anything shaped like an OpenAI key (`sk-…`), an ephemeral key (`ek_…`) or a
bearer credential. It is applied to every page event, every `error` message and
close reason, every HTTP error body and every log record: `configure()` installs a
log-record factory, so no logger, ours or a library's, and no handler can bypass it.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Iterable

MASK = "[redacted]"
#: OpenAI-style secret keys, our own ephemeral keys, and whatever follows "Bearer".
_SHAPED = re.compile(r"\b(?:sk-[A-Za-z0-9_\-]{8,}|ek_[A-Za-z0-9_\-.]{8,})|(?<=Bearer )[A-Za-z0-9._~+/=\-]{8,}")


class Redactor:
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= 6:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])  # as it appears inside a JSON string
        self._exact = sorted(forms, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self._exact:
            if secret in value:
                value = value.replace(secret, MASK)
        return _SHAPED.sub(MASK, value)

    def needed(self, value: str) -> bool:
        return any(s in value for s in self._exact) or _SHAPED.search(value) is not None


#: The process's redactor, set once from the settings at start (`configure`).
_current = Redactor()


def configure(*secrets: str | None) -> Redactor:
    global _current
    _current = Redactor(secrets)
    _install_record_factory()
    return _current


def redact(value: str) -> str:
    """`value` with every known or key-shaped secret masked."""
    return _current.text(value) if value and _current.needed(value) else value


def _clean_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed format string: leave it to logging to report
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = logging.Formatter().formatException(record.exc_info)
        if redact(text) != text:
            record.exc_text = redact(text)


_factory_installed = False


def _install_record_factory() -> None:
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        _clean_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True
