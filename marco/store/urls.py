"""Passwords out of messages: every error or log line that shows a database or broker URL goes through
:func:`redact` (one helper, so a new message cannot forget it).

``redact`` masks the password of every ``scheme://user:password@host`` in a text, whatever the scheme
(misspelt ones included: ``postgress://marco:PW@db`` is exactly the URL a user gets wrong) and whether or
not the text is a URL by itself (a driver's error message quoting its connection string).
"""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@  (user may be empty: redis://:password@host); the password runs to the last '@'
# before the host, so a password containing '@' or ':' is masked whole
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>[^\s'\"]*)@(?=[^@\s'\"]*(?:[\s'\"]|$))")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


def safe_url(url: object) -> str:
    """One URL for a message (a string or a SQLAlchemy ``URL``), its password masked (``''`` for None)."""
    if url is None:
        return ""
    if hasattr(url, "render_as_string"):
        url = url.render_as_string(hide_password=False)
    return redact(str(url))


def one_line(exc: BaseException) -> str:
    """An exception's first line for a message or a stored reason, passwords masked."""
    text = str(exc).strip()
    return redact(text.splitlines()[0]) if text else type(exc).__name__


_installed = False


def install_redaction() -> None:
    """Mask URL passwords in every log record this process makes (message, arguments and traceback) and in
    an uncaught exception's traceback: the worker, the scheduler, Flower and the CLI install it at start.
    Idempotent."""
    import logging
    import sys
    import traceback

    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def redacting_record(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: leave it to the handler to report
            return record
        if "://" in message:
            record.msg, record.args = redact(message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    logging.setLogRecordFactory(redacting_record)
    previous_hook = sys.excepthook

    def redacting_hook(kind: type[BaseException], value: BaseException, tb: object) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))  # type: ignore[arg-type]

    if previous_hook is sys.__excepthook__:
        sys.excepthook = redacting_hook
