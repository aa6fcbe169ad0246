"""Every error scalebox_kernel raises, in one hierarchy: catch at the level you care about."""

from __future__ import annotations

import re
from collections.abc import Iterable


class ScaleboxError(Exception):
    """Base of every error raised by scalebox_kernel."""

    #: The HTTP status of the answer behind the error, when there was one.
    status_code: int | None = None
    #: The server's error code (a Connect code such as `not_found`, or a REST `code`), when it gave one.
    code: str | None = None


class AuthenticationError(ScaleboxError):
    """The API key or the sandbox's access token was missing or wrong."""


class InvalidArgument(ScaleboxError):
    """The request was malformed or named something that cannot be (an unknown language, a bad path)."""


class LanguageNotAvailable(InvalidArgument):
    """The sandbox server has no kernel for the language asked for."""


class NotFound(ScaleboxError):
    """A file, directory, process or context that does not exist."""


class AlreadyExists(ScaleboxError):
    """The thing to create is already there."""


class SandboxNotFound(NotFound):
    """No sandbox with that id is known to the server (never existed, killed, or expired)."""


class SandboxExpired(SandboxNotFound):
    """The sandbox existed but its timeout ran out, so it was killed and its state is gone."""


class SandboxPaused(ScaleboxError):
    """The sandbox is paused; connect to it (or resume) before running code."""


class RateLimited(ScaleboxError):
    """The server asked us to slow down (HTTP 429)."""


class NotEnoughSpace(ScaleboxError):
    """The sandbox's disk is full (HTTP 507)."""


class ServerUnavailable(ScaleboxError):
    """The sandbox server could not be reached, answered 502/503/504 after retries, or went silent mid-stream."""

    #: Seconds a stream carried nothing (not even a keepalive) before the call gave up, when that is the reason.
    silent_for: float | None = None


class ScaleboxTimeout(ScaleboxError, TimeoutError):
    """Something took longer than its time limit."""


class RequestTimeout(ScaleboxTimeout):
    """One HTTP request to the server took longer than `request_timeout`."""


class ExecutionTimeout(ScaleboxTimeout):
    """A cell or command ran longer than the time it was given."""


class CommandExitError(ScaleboxError):
    """A foreground command exited with a non-zero code (its output is on the exception)."""

    def __init__(self, exit_code: int, stdout: str, stderr: str, error: str | None = None) -> None:
        detail = (error or stderr.strip().splitlines()[-1:] or [""])[0] if (error or stderr.strip()) else ""
        super().__init__(f"command exited with code {exit_code}" + (f": {detail}" if detail else ""))
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.error = error


_REDACTED = "***"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every secret (API key, access token) replaced, so it can be shown or logged."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, _REDACTED)
    return re.sub(r"(?i)(x-api-key|x-access-token)([\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+", r"\1\2" + _REDACTED, text)
