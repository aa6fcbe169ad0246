"""HTTP for the client: one httpx.AsyncClient per sandbox, bounded retries, and HTTP statuses as typed errors.

Every message that leaves this module is redacted: neither the API key nor an access token ever appears in an
exception, whatever the server echoes back.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from .. import errors
from ..errors import ScaleboxError, redact
from ..protocol.connect import ConnectError
from .connection import Connection
from .http11 import Http11Transport

log = logging.getLogger("scalebox_kernel.client")

RETRY_STATUSES = frozenset({502, 503, 504})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
#: Parsed URLs and header sets a transport keeps (a sandbox's agent calls reuse a handful of each).
_CACHED = 256


def _ssl_context(verify: str | bool, trust_env: bool) -> ssl.SSLContext:
    """What HTTPS trusts: the CA file given, or the default bundle (SSL_CERT_FILE when trust_env), or nothing."""
    if not isinstance(verify, str):
        return httpx.create_ssl_context(verify=verify, trust_env=trust_env)
    try:
        return ssl.create_default_context(cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        raise ScaleboxError(f"Cannot load the CA file {verify!r} ({exc}); check SCALEBOX_CA_FILE.") from None


def _timeout(total: float | None, idle: float | None = None, *, streaming: bool = False) -> httpx.Timeout:
    """`total` bounds connect, write and pool; `idle` (streams only, 0 or None: no bound) the silence between two
    chunks, response headers included."""
    limit = total or None
    return httpx.Timeout(
        limit, connect=min(limit, 10.0) if limit else 10.0, read=(idle or None) if streaming else limit
    )


def error_body(response: httpx.Response) -> tuple[str | None, str]:
    """The (code, message) of an error answer, whatever its shape (REST `error`/`message`, Connect `code`)."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text.strip()[:300] or response.reason_phrase
    if not isinstance(body, dict):
        return None, str(body)[:300]
    code = body.get("code")
    message = body.get("message") or body.get("error") or body.get("detail") or response.reason_phrase
    return (str(code) if code is not None else None), str(message)


class Transport:
    """HTTP to one server (control plane and sandbox agents), with retries on transient failures."""

    def __init__(self, connection: Connection, *, max_retries: int = 3, backoff: float = 0.25) -> None:
        self.connection = connection
        self.max_retries = max_retries
        self.backoff = backoff
        self._secrets: list[str] = [connection.api_key]
        trust_env = not connection.is_loopback  # no proxy, nor the environment's CA bundle, for scalebox-local
        context = _ssl_context(connection.verify, trust_env=True)  # SSL_CERT_FILE / SSL_CERT_DIR: for every server
        # Direct connections go on our own HTTP/1.1 transport, requests built here and sent on it (httpx's client
        # layer costs more than a trivial cell); with a proxy in the environment, httpx's client sends them.
        self._direct = None if trust_env and urllib.request.getproxies() else Http11Transport(context)
        self.http = httpx.AsyncClient(
            verify=context, trust_env=trust_env, follow_redirects=False, transport=self._direct
        )
        self._headers = dict(self.http.headers)  # Accept, Accept-Encoding, Connection, User-Agent
        self._timeouts = _timeout(connection.request_timeout).as_dict()
        self._stream_timeouts = _timeout(
            connection.request_timeout, connection.stream_idle_timeout, streaming=True
        ).as_dict()
        self._urls: dict[str, httpx.URL] = {}
        self._header_sets: dict[tuple[tuple[str, str], ...], httpx.Headers] = {}

    @property
    def secrets(self) -> list[str]:
        """The values this transport keeps out of every message (API key, access tokens)."""
        return list(self._secrets)

    def add_secret(self, secret: str | None) -> None:
        if secret and secret not in self._secrets:
            self._secrets.append(secret)

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def error(self, cls: type[ScaleboxError], message: str, **attrs: Any) -> ScaleboxError:
        """An exception of type `cls` whose message is redacted, with extra attributes (status_code, code)."""
        exc = cls(self.redact(message))
        for name, value in attrs.items():
            setattr(exc, name, value)
        return exc

    async def aclose(self) -> None:
        await self.http.aclose()

    # ------------------------------------------------------------------------------------------ requests

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        idempotent: bool | None = None,
        retry_statuses: frozenset[int] = RETRY_STATUSES,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request, retrying connection failures always, and `retry_statuses` or drops when `idempotent`.
        `timeout` (s) replaces the request timeout; kwargs are httpx.Request's (headers, content, json, files…)."""
        timeouts = self._timeouts if timeout is None else httpx.Timeout(timeout).as_dict()
        request = self._build(method, url, timeouts, **kwargs)
        return await self._send(request, what=what, idempotent=idempotent, stream=False, retry_statuses=retry_statuses)

    @asynccontextmanager
    async def stream(self, method: str, url: str, *, what: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """A streamed response (closed on exit, which tells the server the client went away). Reading it raises
        httpx.ReadTimeout after `stream_idle_timeout` s of silence: `silence_error` says what that means."""
        request = self._build(method, url, self._stream_timeouts, **kwargs)
        response = await self._send(request, what=what, idempotent=False, stream=True, retry_statuses=RETRY_STATUSES)
        try:
            yield response
        finally:
            await response.aclose()

    def _build(
        self,
        method: str,
        url: str,
        timeouts: dict[str, float | None],
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Request:
        """An httpx.Request, its URL and headers parsed once for the few this client sends again and again."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= _CACHED:
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        key = tuple(headers.items()) if headers else ()
        merged = self._header_sets.get(key)
        if merged is None:
            if len(self._header_sets) >= _CACHED:
                self._header_sets.clear()
            merged = self._header_sets[key] = httpx.Headers({**self._headers, **(headers or {})})
        return httpx.Request(method, parsed, headers=merged, extensions={"timeout": timeouts}, **kwargs)

    async def _dispatch(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """One attempt: on our transport when the connection is direct, else through httpx's client (proxies)."""
        if self._direct is None:
            return await self.http.send(request, stream=stream)
        response = await self._direct.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    async def _send(
        self,
        request: httpx.Request,
        *,
        what: str,
        idempotent: bool | None,
        stream: bool,
        retry_statuses: frozenset[int],
    ) -> httpx.Response:
        if idempotent is None:
            idempotent = request.method in IDEMPOTENT_METHODS
        attempt = 0
        while True:
            delay = self.backoff * (2**attempt) * (0.75 + random.random() / 2)
            try:
                response = await self._dispatch(request, stream)
            except httpx.ConnectTimeout as exc:
                failure: Exception = exc
            except httpx.ConnectError as exc:
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise self.error(
                        errors.ServerUnavailable,
                        f"{what}: the TLS certificate of {request.url.host} is not trusted ({exc}). "
                        "Set SCALEBOX_CA_FILE to the server's certificate.",
                    ) from None
                failure = exc
            except httpx.ReadTimeout as exc:
                raise (self.silence_error(what) if stream else self.transport_error(exc, what)) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                if not idempotent:
                    raise self.transport_error(exc, what) from None
                failure = exc
            except httpx.HTTPError as exc:
                raise self.transport_error(exc, what) from None
            else:
                if not (idempotent and response.status_code in retry_statuses and attempt < self.max_retries):
                    return response
                await response.aclose()
                failure = httpx.HTTPStatusError(f"HTTP {response.status_code}", request=request, response=response)
                delay = max(delay, min(_retry_after(response), 5.0))
            if attempt >= self.max_retries:
                raise self.transport_error(failure, what) from None
            log.debug("%s: retrying after %s (attempt %d)", what, self.redact(repr(failure)), attempt + 2)
            attempt += 1
            await asyncio.sleep(min(delay, 5.0))

    def transport_error(self, exc: Exception, what: str) -> ScaleboxError:
        """An httpx failure (no usable answer) as a typed, actionable error."""
        host = self.connection.api_url
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return self.error(
                errors.RequestTimeout,
                f"{what}: no answer within the request timeout ({type(exc).__name__}). "
                "Raise request_timeout (SCALEBOX_REQUEST_TIMEOUT) if the server is just slow.",
            )
        if isinstance(exc, httpx.HTTPStatusError):
            return self.error(
                errors.ServerUnavailable,
                f"{what}: the server answered {exc.response.status_code} after {self.max_retries + 1} attempts; "
                "it may be overloaded or restarting. Try again shortly.",
                status_code=exc.response.status_code,
            )
        hint = " Is scalebox-local running (`jupyter scalebox serve`)?" if self.connection.local else ""
        return self.error(
            errors.ServerUnavailable,
            f"{what}: cannot reach the Scalebox server at {host} "
            f"({type(exc).__name__}: {exc or 'connection lost'}).{hint}",
        )

    def silence_error(self, what: str) -> ScaleboxError:
        """A stream that carried nothing, not even a keepalive, for `stream_idle_timeout` s: the server is gone."""
        idle = self.connection.stream_idle_timeout
        hint = (
            "Is scalebox-local still running, and not stopped or swamped (`jupyter scalebox serve`)?"
            if self.connection.local or self.connection.is_loopback
            else f"Check the network to {self.connection.api_url}."
        )
        return self.error(
            errors.ServerUnavailable,
            f"{what}: the server sent nothing for {idle:g} s, not even a keepalive, so the call was given up. "
            f"{hint} If the server is only slow, raise stream_idle_timeout (SCALEBOX_STREAM_IDLE_TIMEOUT).",
            silent_for=idle,
        )

    def broken_stream_error(self, exc: Exception, what: str) -> ScaleboxError:
        """A stream whose connection failed after the server had answered (reset, closed mid-frame)."""
        local = self.connection.local or self.connection.is_loopback
        hint = " Is scalebox-local still running (`jupyter scalebox serve`)?" if local else ""
        return self.error(
            errors.ServerUnavailable,
            f"{what}: the connection to the server at {self.connection.api_url} broke mid-stream "
            f"({type(exc).__name__}: {exc or 'connection lost'}).{hint}",
        )

    # ------------------------------------------------------------------------------------------ errors

    def rest_error(self, response: httpx.Response, what: str, sandbox_id: str | None = None) -> ScaleboxError:
        """A control-plane (or file endpoint) error answer as a typed exception."""
        status = response.status_code
        code, message = error_body(response)
        attrs = {"status_code": status, "code": code}
        detail = f"{what}: {message} (HTTP {status})"
        if status in (401, 403):
            return self.error(
                errors.AuthenticationError,
                f"{detail}. Check the API key (SCALEBOX_API_KEY) for {self.connection.api_url}.",
                **attrs,
            )
        if status == 404 and sandbox_id:
            if code == "sandbox_expired" or "expired" in message.lower():
                return self.error(
                    errors.SandboxExpired, f"{detail}. Its timeout ran out; create a new sandbox.", **attrs
                )
            return self.error(
                errors.SandboxNotFound,
                f"{detail}. Check the sandbox id, or create a new sandbox.",
                **attrs,
            )
        cls: type[ScaleboxError] = {
            400: errors.InvalidArgument,
            404: errors.NotFound,
            408: errors.RequestTimeout,
            413: errors.InvalidArgument,
            422: errors.InvalidArgument,
            429: errors.RateLimited,
            502: errors.ServerUnavailable,
            503: errors.ServerUnavailable,
            504: errors.ServerUnavailable,
            507: errors.NotEnoughSpace,
        }.get(status, ScaleboxError)
        return self.error(cls, detail, **attrs)

    def connect_error(self, err: ConnectError, what: str, sandbox_id: str | None = None) -> ScaleboxError:
        """A Connect error (unary body or end-of-stream frame) as a typed exception."""
        code, message = err.code, err.message
        lower = message.lower()
        attrs = {"code": code, "status_code": err.http_status}
        detail = f"{what}: {message} ({code})"
        cls: type[ScaleboxError]
        if code == "unauthenticated":
            return self.error(errors.AuthenticationError, f"{detail}. The sandbox's access token was refused.", **attrs)
        if code == "not_found":
            if "sandbox" in lower and "expired" in lower:
                cls = errors.SandboxExpired
            elif sandbox_id and sandbox_id in message and "not found" in lower:
                cls = errors.SandboxNotFound
            else:
                cls = errors.NotFound
        elif code in ("invalid_argument", "failed_precondition", "out_of_range", "permission_denied"):
            if "language" in lower:
                cls = errors.LanguageNotAvailable
            elif "paused" in lower:
                cls = errors.SandboxPaused
            else:
                cls = errors.InvalidArgument
        elif code == "already_exists":
            cls = errors.AlreadyExists
        elif code == "deadline_exceeded":
            cls = errors.RequestTimeout
        elif code == "unavailable":
            cls = errors.ServerUnavailable
        elif code == "resource_exhausted":
            cls = errors.NotEnoughSpace if ("space" in lower or "disk" in lower) else ScaleboxError
        else:
            cls = ScaleboxError
        return self.error(cls, detail, **attrs)


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0
