"""The one outbound HTTP client.

Everything that leaves the process toward a URL a tenant, a user or a model can influence (the
HTTP-fetch tool, MCP servers, model-provider base URLs, webhooks) goes through this module, so
that a URL cannot be used to reach the control plane's own network (SSRF).

What it guarantees, and why each part is there:

- The checks read the request's own URL object, parsed by the library that then connects, and
  forms that parsers disagree about are refused outright rather than interpreted: user info
  (``http://evil@127.0.0.1``), numeric hosts in unusual spellings (``0x7f.1``, ``2130706433``,
  ``0177.0.0.1``), trailing dots, stray characters, schemes other than http(s).
- The host is resolved once, and **every** address must be public (``is_global``, and not
  multicast, unspecified or reserved) unless it lies in a network the operator allow-listed in
  ``EGRESS_ALLOWED_NETWORKS``. One private address among public ones is enough to refuse: the
  resolver could hand out either.
- The connection goes to the address that was checked. The transport pins the checked addresses
  for the duration of the request and its network backend connects only to those, so an answer
  that changes between the check and the connect (DNS rebinding) changes nothing. The URL keeps
  its host name, so the Host header, TLS SNI and certificate verification are for the host name.
- Every redirect is a new request through the same transport, so it is checked again.

The transports are the single enforcement point, and they share every check: `fetch`/`afetch`
and `guarded_client`/`guarded_async_client` send through `EgressTransport`/`AsyncEgressTransport`
(httpx); `mcp_httpx_client_factory` through `AsyncEgressTransport2`, the same transport for
httpx2, which the mcp package uses; `guarded_openai_http_client` (model calls, a chunk per
token) through `AiohttpEgressTransport`, an httpx2 transport that sends with aiohttp, whose C
HTTP parser costs about a third less CPU per streamed completion than httpcore and h11
(docs/benchmark.md).

Settings (read on every request, so pytest-django's ``settings`` fixture works):

- ``EGRESS_ALLOWED_NETWORKS``: CIDR strings that may be reached although not public, e.g.
  ``["10.20.0.0/16"]`` for an internal model gateway; tests use `LOOPBACK_NETWORKS`.
- ``EGRESS_ALLOWED_PORTS``: if non-empty, the only ports requests may use.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import contextvars
import functools
import ipaddress
import json as jsonlib
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, Protocol, TypeVar

import aiohttp
import aiohttp.abc
import anyio
import anyio.to_thread
import httpcore
import httpcore2
import httpx
import httpx2
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

__all__ = [
    "LOOPBACK_NETWORKS",
    "AiohttpEgressTransport",
    "AsyncEgressTransport",
    "AsyncEgressTransport2",
    "EgressDenied",
    "EgressError",
    "EgressResponse",
    "EgressTransport",
    "ResolvedURL",
    "acheck_url",
    "afetch",
    "check_url",
    "connection_is_guarded",
    "fetch",
    "guarded_async_client",
    "guarded_client",
    "guarded_openai_http_client",
    "mcp_httpx_client_factory",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: What tests (and a single-machine dev setup) allow-list to reach local servers.
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PUBLIC_ONLY = "outbound requests may only reach public addresses"


# --- Errors -------------------------------------------------------------------------------------


class EgressDenied(ValueError):
    """The URL may not be requested; the message says why in words a tenant admin understands.

    `url` is the refused URL (user info and query string left out), `reason` the verb phrase that
    follows it, and `via` the URL that redirected there, if any.
    """

    def __init__(self, url: str, reason: str, via: str | None = None) -> None:
        # All three in `args`, so that pickling and Celery's exception serialisation rebuild it.
        super().__init__(url, reason, via)
        self.url = url
        self.reason = reason
        self.via = via

    def __str__(self) -> str:
        if self.via is None:
            return f"{self.url} {self.reason}"
        return f"{self.via} redirected to {self.url}, which {self.reason}"


class EgressError(Exception):
    """The request was allowed but did not complete: timeout, response too large, DNS or
    connection failure, invalid response. The message is in plain words."""


# --- Policy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Policy:
    networks: tuple[IPNetwork, ...]
    ports: frozenset[int]  # empty: any port


def _policy() -> _Policy:
    networks = getattr(settings, "EGRESS_ALLOWED_NETWORKS", None) or ()
    ports = getattr(settings, "EGRESS_ALLOWED_PORTS", None) or ()
    # A value read straight from the environment arrives as one comma-separated string.
    if isinstance(networks, str):
        networks = networks.split(",")
    if isinstance(ports, str | int):
        ports = str(ports).split(",")
    return _parse_policy(tuple(str(n).strip() for n in networks), tuple(str(p) for p in ports))


@functools.lru_cache(maxsize=16)
def _parse_policy(networks: tuple[str, ...], ports: tuple[str, ...]) -> _Policy:
    parsed_networks: list[IPNetwork] = []
    for network in networks:
        if not network:
            continue
        try:
            parsed_networks.append(ipaddress.ip_network(network, strict=False))
        except ValueError as exc:
            raise ImproperlyConfigured(f"EGRESS_ALLOWED_NETWORKS: {network!r} is not a CIDR: {exc}")
    parsed_ports: set[int] = set()
    for port in ports:
        if not port.strip():
            continue
        if not port.strip().isdigit() or not 1 <= int(port) <= 65535:
            raise ImproperlyConfigured(f"EGRESS_ALLOWED_PORTS: {port!r} is not a port number")
        parsed_ports.add(int(port))
    return _Policy(networks=tuple(parsed_networks), ports=frozenset(parsed_ports))


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address a 6to4, Teredo or NAT64 address leads to: `is_global` judges those
    prefixes as a whole, so ``64:ff9b::7f00:1`` (loopback, through NAT64) would pass."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _address_problem(ip: IPAddress, policy: _Policy) -> str | None:
    """What is wrong with connecting to `ip`, as a noun phrase; None when it may be reached."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # The kernel connects an IPv4-mapped address to the IPv4 one: judge that.
        ip = ip.ipv4_mapped
    # Never useful for HTTP, whatever the allow-list says (0.0.0.0 reaches this very host).
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if any(ip in network for network in policy.networks):
        return None
    embedded = _embedded_ipv4(ip)
    if embedded is not None and (problem := _address_problem(embedded, policy)):
        return problem
    if ip.is_global and not ip.is_reserved:
        return None
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    return "a non-public address"


# --- URL inspection -----------------------------------------------------------------------------

_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")
_HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
# A last label like these makes WHATWG parsers (browsers, curl) read the host as an IPv4 number.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


def _display(url: str) -> str:
    """The URL as shown in messages, which end up in logs and UIs: without user info and query
    string, where credentials and tokens live."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        return url.split("?", 1)[0].split("#", 1)[0]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, rest = rest[:end], rest[end:]
    if "@" in authority:
        authority = "…@" + authority.rsplit("@", 1)[1]
    path, question, _ = rest.split("#", 1)[0].partition("?")
    return f"{scheme}://{authority}{path}{'?…' if question else ''}"


class _URL(Protocol):
    """What the checks read from a URL: httpx.URL and httpx2.URL both have it. The request's own
    URL object is checked, so the parser that decides where to connect is the one checked."""

    @property
    def scheme(self) -> str: ...
    @property
    def userinfo(self) -> bytes: ...
    @property
    def raw_host(self) -> bytes: ...
    @property
    def port(self) -> int | None: ...


@dataclass(frozen=True)
class _Target:
    url: _URL
    shown: str
    scheme: str
    host: str  # ASCII (IDNA), lower case, without brackets
    port: int
    literal: IPAddress | None


def _inspect(url: str | _URL) -> _Target:
    """Everything that can be said about the URL before resolving it. Raises EgressDenied."""
    parsed: _URL
    if isinstance(url, str):
        shown = _display(url)
        if _UNSAFE_CHARACTERS.search(url):
            raise EgressDenied(shown, "contains spaces, control characters or backslashes")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            detail = str(exc)
            raise EgressDenied(shown, f"is not a valid URL ({detail[:1].lower()}{detail[1:]})")
    else:
        parsed = url
        shown = _display(str(url))
    if parsed.scheme not in _DEFAULT_PORTS:
        scheme = parsed.scheme or "(none)"
        raise EgressDenied(
            shown, f"uses the scheme '{scheme}'; outbound requests may only use http and https"
        )
    if parsed.userinfo:
        raise EgressDenied(
            shown,
            "has a user name or password before the host; send credentials in a header instead",
        )
    host = parsed.raw_host.decode("ascii", errors="replace").lower()
    if not host:
        raise EgressDenied(shown, "has no host name")
    port = parsed.port if parsed.port is not None else _DEFAULT_PORTS[parsed.scheme]
    if not 1 <= port <= 65535:
        raise EgressDenied(shown, f"has an invalid port ({port})")

    literal: IPAddress | None = None
    if ":" in host:
        try:
            literal = ipaddress.IPv6Address(host)
        except ValueError:
            literal = None
        if literal is None or literal.scope_id:  # a zone ("%eth0") names an interface, not a host
            raise EgressDenied(shown, f"has an invalid host ({host})")
    else:
        try:
            literal = ipaddress.IPv4Address(host)
        except ValueError:
            pass
    if literal is None:
        if host.endswith("."):
            raise EgressDenied(
                shown, "has a host name ending in a dot; write it without the trailing dot"
            )
        if len(host) > 253 or not _HOST_NAME.fullmatch(host):
            raise EgressDenied(shown, f"has an invalid host name ({host})")
        if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
            raise EgressDenied(
                shown,
                f"has a numeric host written in an unusual form ({host}); "
                "write IP addresses as four decimal numbers, like 93.184.215.14",
            )

    policy = _policy()
    if policy.ports and port not in policy.ports:
        allowed = ", ".join(str(p) for p in sorted(policy.ports))
        raise EgressDenied(
            shown, f"uses port {port}; outbound requests may only use port(s) {allowed}"
        )
    return _Target(
        url=parsed, shown=shown, scheme=parsed.scheme, host=host, port=port, literal=literal
    )


@dataclass(frozen=True)
class ResolvedURL:
    """A URL that passed the checks, with every address its host resolved to (all allowed)."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...]


def _judge(target: _Target, addresses: tuple[str, ...]) -> ResolvedURL:
    policy = _policy()
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise EgressDenied(target.shown, "resolves to something that is not an IP address")
        problem = _address_problem(ip, policy)
        if problem is not None:
            raise EgressDenied(target.shown, f"resolves to {problem} ({address}); {_PUBLIC_ONLY}")
    return ResolvedURL(
        url=str(target.url),
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        addresses=addresses,
    )


# --- Resolution ---------------------------------------------------------------------------------


def _lookup(host: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        detail = getattr(exc, "strerror", None) or str(exc)
        raise EgressError(f"could not find the address of {host} (DNS lookup failed: {detail})")
    families = (socket.AF_INET, socket.AF_INET6)
    addresses = tuple(dict.fromkeys(str(i[4][0]) for i in infos if i[0] in families))
    if not addresses:
        raise EgressError(f"could not find the address of {host} (DNS returned no address)")
    return addresses


# Sync lookups run here so that a stuck resolver cannot outlast the request's time limit.
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="egress-dns")


def _lookup_sync(host: str, port: int, timeout: float | None) -> tuple[str, ...]:
    """Resolve `host`; raise TimeoutError after `timeout` seconds, EgressError on failure."""
    if timeout is None:
        return _lookup(host, port)
    return _LOOKUPS.submit(_lookup, host, port).result(timeout=timeout)


async def _lookup_async(host: str, port: int, limit: float | None) -> tuple[str, ...]:
    with anyio.fail_after(limit):
        return await anyio.to_thread.run_sync(_lookup, host, port, abandon_on_cancel=True)


def check_url(url: str | _URL, *, timeout: float | None = 10.0) -> ResolvedURL:
    """Check `url` the way every request is checked, resolving its host once.

    For validating a URL when it is saved (an MCP server, a webhook); the request itself is
    checked again when it is sent. Raises EgressDenied when the URL may not be requested, and
    EgressError when its host cannot be resolved.
    """
    target = _inspect(url)
    if target.literal is not None:
        return _judge(target, (target.host,))
    try:
        return _judge(target, _lookup_sync(target.host, target.port, timeout))
    except TimeoutError:
        raise EgressError(f"looking up {target.host} took longer than {timeout:g} seconds")


async def acheck_url(
    url: str | _URL,
    *,
    timeout: float | None = 10.0,  # noqa: ASYNC109 - the same signature as check_url
) -> ResolvedURL:
    """`check_url` for async code: the lookup runs in a worker thread."""
    target = _inspect(url)
    if target.literal is not None:
        return _judge(target, (target.host,))
    try:
        return _judge(target, await _lookup_async(target.host, target.port, timeout))
    except TimeoutError:
        raise EgressError(f"looking up {target.host} took longer than {timeout:g} seconds")


# --- Pinned connections -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pin:
    host: str
    port: int
    addresses: tuple[str, ...]


# The checked addresses of the request being sent. The pool opens its connections inside the
# transport's call (same thread, same task), so a context variable carries them to the backend.
_PINNED: contextvars.ContextVar[_Pin | None] = contextvars.ContextVar("egress_pin", default=None)
# A deadline (time.monotonic()) for everything the sync `fetch` does, including slow drips.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "egress_deadline", default=None
)
_CONNECTING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "egress_connecting", default=False
)


def connection_is_guarded() -> bool:
    """True while this module's backend opens a socket: a test socket guard patched onto
    ``socket.socket.connect`` can refuse every connection for which this is False."""
    return _CONNECTING.get()


def _pinned_addresses(host: str, port: int) -> tuple[str, ...]:
    pin = _PINNED.get()
    if pin is None or (pin.host, pin.port) != (host.lower(), port):
        # The pool asked for a connection the transport did not check: fail closed.
        raise EgressDenied(f"{host}:{port}", "was not checked before connecting")
    return pin.addresses


def _remaining(timeout: float | None, timeout_error: Callable[[str], Exception]) -> float | None:
    """`timeout`, shortened to what is left before the `fetch` deadline, if there is one."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error("the time limit for this request ran out")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """Shortens every read and write to the `fetch` deadline: per-read timeouts alone let a
    server that sends one byte a second hold a request forever."""

    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _remaining(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _remaining(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _remaining(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


_Stream = TypeVar("_Stream")


def _connect_pinned(
    connect: Callable[..., _Stream], host: str, port: int, retry_on: tuple[type[Exception], ...]
) -> _Stream:
    """Try the checked addresses of (host, port) in order; `connect` opens one."""
    failure: Exception | None = None
    for address in _pinned_addresses(host, port):
        token = _CONNECTING.set(True)
        try:
            return connect(address)
        except retry_on as exc:
            failure = exc
        finally:
            _CONNECTING.reset(token)
    assert failure is not None  # a pin always holds at least one address
    raise failure


async def _aconnect_pinned(
    connect: Callable[[str], Awaitable[_Stream]],
    host: str,
    port: int,
    retry_on: tuple[type[Exception], ...],
) -> _Stream:
    """The async `_connect_pinned`."""
    failure: Exception | None = None
    for address in _pinned_addresses(host, port):
        token = _CONNECTING.set(True)
        try:
            return await connect(address)
        except retry_on as exc:
            failure = exc
        finally:
            _CONNECTING.reset(token)
    assert failure is not None  # a pin always holds at least one address
    raise failure


def _no_unix_socket(path: str) -> EgressDenied:
    return EgressDenied(path, "is a unix socket; outbound requests may only use TCP")


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects to the addresses the transport checked, never to what the host name says now."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        def connect(address: str) -> httpcore.NetworkStream:
            stream = self._backend.connect_tcp(
                address,
                port,
                timeout=_remaining(timeout, httpcore.ConnectTimeout),
                local_address=local_address,
                socket_options=socket_options,
            )
            return _DeadlineStream(stream)

        return _connect_pinned(
            connect, host, port, (httpcore.ConnectError, httpcore.ConnectTimeout)
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise _no_unix_socket(path)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class _AsyncPinnedBackend(httpcore.AsyncNetworkBackend):
    """The async `_PinnedBackend`. `afetch` bounds the total time with a cancel scope instead."""

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        def connect(address: str) -> Awaitable[httpcore.AsyncNetworkStream]:
            return self._backend.connect_tcp(address, port, timeout, local_address, socket_options)

        return await _aconnect_pinned(
            connect, host, port, (httpcore.ConnectError, httpcore.ConnectTimeout)
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise _no_unix_socket(path)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _AsyncPinnedBackend2(httpcore2.AsyncNetworkBackend):
    """`_AsyncPinnedBackend` for httpcore2, which has the same interface and its own classes."""

    def __init__(self) -> None:
        self._backend = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's backend interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        def connect(address: str) -> Awaitable[httpcore2.AsyncNetworkStream]:
            return self._backend.connect_tcp(address, port, timeout, local_address, socket_options)

        return await _aconnect_pinned(
            connect, host, port, (httpcore2.ConnectError, httpcore2.ConnectTimeout)
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's backend interface
        socket_options: Iterable[httpcore2.SOCKET_OPTION] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        raise _no_unix_socket(path)

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


# --- Transports ---------------------------------------------------------------------------------
#
# The checks live in `_pin`/`_apin`; each transport only adapts them to its library: httpx for
# our own code, httpx2 for the MCP SDK and the OpenAI client, which are built on it.

_DEFAULT_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20)


@functools.lru_cache(maxsize=2)
def _default_ssl_context(library: str) -> ssl.SSLContext:
    # Loading the CA bundle takes milliseconds, and fetch() builds a client per call. Each library
    # keeps its own idea of the default trust store.
    if library == "httpx2":
        return httpx2.create_ssl_context(verify=True, trust_env=False)
    return httpx.create_ssl_context(verify=True, trust_env=False)


def _ssl_context(verify: ssl.SSLContext | bool, library: str = "httpx") -> ssl.SSLContext:
    if verify is True:
        return _default_ssl_context(library)
    return httpx.create_ssl_context(verify=verify, trust_env=False)


class _Request(Protocol):
    url: Any
    extensions: Any


def _connect_timeout(request: _Request) -> float | None:
    value = (request.extensions.get("timeout") or {}).get("connect")
    return float(value) if value is not None else None


def _pin_checked(request: _Request, target: _Target, addresses: tuple[str, ...]) -> _Pin:
    resolved = _judge(target, addresses)
    # SNI and certificate verification are for the URL's host name, whatever the caller says.
    request.extensions = {k: v for k, v in request.extensions.items() if k != "sni_hostname"}
    return _Pin(host=resolved.host, port=resolved.port, addresses=resolved.addresses)


def _pin(
    request: _Request,
    connect_error: Callable[..., Exception],
    connect_timeout: Callable[..., Exception],
) -> _Pin:
    """Check the request and resolve its host once. A lookup failure is raised as the library's
    connect error, as an unpinned client would, so libraries handle it as usual."""
    target = _inspect(request.url)
    if target.literal is not None:
        return _pin_checked(request, target, (target.host,))
    timeout = _remaining(_connect_timeout(request), connect_timeout)
    try:
        addresses = _lookup_sync(target.host, target.port, timeout)
    except TimeoutError:
        raise connect_timeout(f"looking up {target.host} took too long", request=request)
    except EgressError as exc:
        raise connect_error(str(exc), request=request)
    return _pin_checked(request, target, addresses)


async def _apin(
    request: _Request,
    connect_error: Callable[..., Exception],
    connect_timeout: Callable[..., Exception],
) -> _Pin:
    """The async `_pin`; the lookup runs in a worker thread."""
    target = _inspect(request.url)
    if target.literal is not None:
        return _pin_checked(request, target, (target.host,))
    try:
        addresses = await _lookup_async(target.host, target.port, _connect_timeout(request))
    except TimeoutError:
        raise connect_timeout(f"looking up {target.host} took too long", request=request)
    except EgressError as exc:
        raise connect_error(str(exc), request=request)
    return _pin_checked(request, target, addresses)


class EgressTransport(httpx.HTTPTransport):
    """The sync enforcement point: checks each request (each redirect hop is one), resolves its
    host once and connects only to the checked addresses. No proxy, no environment settings."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = _DEFAULT_LIMITS,
    ) -> None:
        context = _ssl_context(verify)
        super().__init__(verify=context, trust_env=False, limits=limits)
        # httpx builds its pool without a way to pass a network backend; replace it with one that
        # has ours. A test fails if a new httpx stops using `_pool`.
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        token = _PINNED.set(_pin(request, httpx.ConnectError, httpx.ConnectTimeout))
        try:
            return super().handle_request(request)
        finally:
            _PINNED.reset(token)


class AsyncEgressTransport(httpx.AsyncHTTPTransport):
    """The async `EgressTransport`."""

    def __init__(
        self,
        *,
        verify: ssl.SSLContext | bool = True,
        limits: httpx.Limits = _DEFAULT_LIMITS,
    ) -> None:
        context = _ssl_context(verify)
        super().__init__(verify=context, trust_env=False, limits=limits)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_AsyncPinnedBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        token = _PINNED.set(await _apin(request, httpx.ConnectError, httpx.ConnectTimeout))
        try:
            return await super().handle_async_request(request)
        finally:
            _PINNED.reset(token)


class AsyncEgressTransport2(httpx2.AsyncHTTPTransport):
    """`AsyncEgressTransport` for httpx2 clients (the MCP SDK and the OpenAI client)."""

    def __init__(
        self, *, verify: ssl.SSLContext | bool = True, limits: httpx2.Limits | None = None
    ) -> None:
        context = _ssl_context(verify, "httpx2")
        limits = limits or httpx2.Limits(max_connections=100, max_keepalive_connections=20)
        super().__init__(verify=context, trust_env=False, limits=limits)
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_AsyncPinnedBackend2(),
        )

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        token = _PINNED.set(await _apin(request, httpx2.ConnectError, httpx2.ConnectTimeout))
        try:
            return await super().handle_async_request(request)
        finally:
            _PINNED.reset(token)


# --- httpx clients for libraries ----------------------------------------------------------------

# Each of these would route requests around the transport (or reconfigure it from the environment).
_REFUSED_CLIENT_ARGUMENTS = frozenset(
    {"transport", "mounts", "proxy", "trust_env", "cert", "http2", "app"}
)


def _transport_arguments(kwargs: dict[str, Any], allowed: Iterable[str]) -> dict[str, Any]:
    refused = sorted(_REFUSED_CLIENT_ARGUMENTS & kwargs.keys())
    if refused:
        raise TypeError(f"a guarded client does not accept {', '.join(refused)}")
    return {name: kwargs.pop(name) for name in allowed if name in kwargs}


def guarded_client(**kwargs: Any) -> httpx.Client:
    """An httpx.Client whose every request, redirects included, goes through `EgressTransport`.

    Takes httpx.Client's arguments except those that would bypass the transport (`transport`,
    `mounts`, `proxy`, `trust_env`, ...). A refused request raises EgressDenied; other failures
    are httpx's usual exceptions.
    """
    transport = EgressTransport(**_transport_arguments(kwargs, ("verify", "limits")))
    return httpx.Client(transport=transport, trust_env=False, **kwargs)


def guarded_async_client(**kwargs: Any) -> httpx.AsyncClient:
    """The async `guarded_client`: an httpx.AsyncClient sending through `AsyncEgressTransport`."""
    transport = AsyncEgressTransport(**_transport_arguments(kwargs, ("verify", "limits")))
    return httpx.AsyncClient(transport=transport, trust_env=False, **kwargs)


# --- aiohttp, for model calls ------------------------------------------------------------------


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's lookups, answered with the addresses `_apin` checked for the request being sent
    (a host it did not check fails closed). aiohttp looks up in the request's own task, and only
    host names: an address literal in the URL is the address `_apin` judged."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in _pinned_addresses(host, port)
        ]

    async def close(self) -> None:
        return None


def _httpx2_error(exc: Exception, request: httpx2.Request) -> Exception | None:
    """The httpx2 exception an httpcore2 transport raises where aiohttp raised `exc` (None: not
    aiohttp's), so callers, the openai client and our retry rules read failures alike."""
    message = str(exc) or type(exc).__name__
    kind: type[httpx2.TransportError]
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        kind = httpx2.ConnectTimeout
    elif isinstance(exc, aiohttp.ServerTimeoutError):  # sock_read: nothing came for that long
        kind = httpx2.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):
        kind = httpx2.ConnectError
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        # The body ended before its end (h11: "peer closed connection without sending complete
        # message body"), or the server closed the connection instead of answering.
        kind = httpx2.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientResponseError):  # not HTTP
        kind = httpx2.RemoteProtocolError
    elif isinstance(exc, aiohttp.ClientOSError):  # reset
        kind = httpx2.ReadError
    elif isinstance(exc, aiohttp.ClientError):
        kind = httpx2.NetworkError
    elif isinstance(exc, TimeoutError):  # waiting for a connection of the pool
        kind = httpx2.PoolTimeout
    else:
        return None
    return kind(message, request=request)


class _AiohttpBody(httpx2.AsyncByteStream):
    """A response body as aiohttp reads it: each piece as it arrives (a streamed completion's
    chunks are not held back), aiohttp's failures as httpx2's."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx2.Request) -> None:
        self._response, self._request = response, request

    async def __aiter__(self) -> Any:
        try:
            async for piece in self._response.content.iter_any():
                yield piece
        except Exception as exc:
            mapped = _httpx2_error(exc, self._request)
            if mapped is None:
                raise
            raise mapped from exc

    async def aclose(self) -> None:
        # Back to the pool if the body was read to its end, closed otherwise.
        self._response.release()


class AiohttpEgressTransport(httpx2.AsyncBaseTransport):
    """`AsyncEgressTransport2`'s checks, sending with aiohttp: each request is checked and its
    host resolved once (`_apin`), and the pool's connector connects only to those addresses
    (`_PinnedResolver`, with aiohttp's own lookup cache off). No proxy, no environment
    settings, no redirects of its own (httpx2's client follows them, each through here)."""

    def __init__(
        self, *, verify: ssl.SSLContext | bool = True, limits: httpx2.Limits | None = None
    ) -> None:
        self._ssl = _ssl_context(verify, "httpx2")
        self._limits = limits or httpx2.Limits(max_connections=100, max_keepalive_connections=20)
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        # Made on the first request, on the event loop that sends it (an aiohttp session
        # belongs to one loop, as an httpx client does).
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                resolver=_PinnedResolver(),
                use_dns_cache=False,
                limit=self._limits.max_connections or 0,
                limit_per_host=0,
                keepalive_timeout=self._limits.keepalive_expiry or 5.0,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False
            )
        return self._session

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        pin = _PINNED.set(await _apin(request, httpx2.ConnectError, httpx2.ConnectTimeout))
        # What opens a socket during this request connects to the checked addresses only.
        connecting = _CONNECTING.set(True)
        try:
            try:
                body = request.content
            except httpx2.RequestNotRead:  # a streamed body: aiohttp sends bytes
                body = await request.aread()
            timeouts = request.extensions.get("timeout") or {}
            try:
                response = await self._session_now().request(
                    request.method,
                    str(request.url),
                    # aiohttp frames the body (bytes: Content-Length) itself; a streamed body
                    # read whole must not go out announced as chunked.
                    headers=[
                        (name.decode("latin-1"), value.decode("latin-1"))
                        for name, value in request.headers.raw
                        if name.lower() not in (b"transfer-encoding", b"content-length")
                    ],
                    data=body or None,
                    allow_redirects=False,
                    compress=None,
                    timeout=aiohttp.ClientTimeout(
                        total=None,
                        connect=timeouts.get("pool"),
                        sock_connect=timeouts.get("connect"),
                        sock_read=timeouts.get("read"),
                    ),
                )
            except Exception as exc:
                mapped = _httpx2_error(exc, request)
                if mapped is None:
                    raise
                raise mapped from exc
        finally:
            _CONNECTING.reset(connecting)
            _PINNED.reset(pin)
        extensions: dict[str, Any] = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode("latin-1", "replace")
        return httpx2.Response(
            status_code=response.status,
            headers=list(response.raw_headers),
            stream=_AiohttpBody(response, request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- httpx2 clients for libraries ---------------------------------------------------------------


def guarded_openai_http_client(**kwargs: Any) -> httpx2.AsyncClient:
    """An httpx2.AsyncClient for ``AsyncOpenAI(http_client=...)`` (the openai package is built on
    httpx2), sending through `AiohttpEgressTransport`. Takes httpx2.AsyncClient's arguments
    except those that would bypass the transport; `limits` sizes its connection pool (e.g. a run
    host's client, shared by hundreds of runs, keeps as many connections alive)."""
    transport = AiohttpEgressTransport(**_transport_arguments(kwargs, ("verify", "limits")))
    return httpx2.AsyncClient(transport=transport, trust_env=False, **kwargs)


def _guarded_httpx2_client(**kwargs: Any) -> httpx2.AsyncClient:
    transport = AsyncEgressTransport2(**_transport_arguments(kwargs, ("verify", "limits")))
    return httpx2.AsyncClient(transport=transport, trust_env=False, **kwargs)


def mcp_httpx_client_factory(
    headers: dict[str, str] | None = None,
    timeout: httpx2.Timeout | None = None,
    auth: httpx2.Auth | None = None,
) -> httpx2.AsyncClient:
    """An ``httpx_client_factory`` for the MCP SDK (and the Agents SDK's MCP servers): the MCP
    SDK's own defaults (30 s, 300 s between stream events, redirects followed by the SDK within
    the origin), sending through `AsyncEgressTransport2`."""
    if timeout is None:
        timeout = httpx2.Timeout(30.0, read=300.0)
    return _guarded_httpx2_client(headers=headers, timeout=timeout, auth=auth)


# --- fetch / afetch -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressResponse:
    """A complete response: `url` is the final URL after redirects."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    url: str

    @property
    def encoding(self) -> str:
        message = Message()
        message["content-type"] = self.headers.get("content-type", "")
        charset = message.get_content_charset() or "utf-8"
        try:
            return codecs.lookup(charset).name
        except LookupError:
            return "utf-8"

    @property
    def text(self) -> str:
        return self.content.decode(self.encoding, errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


# Caller headers that may follow a redirect to another origin; the rest (API keys, tokens, cookies
# under any name) stay with the origin they were meant for.
_HEADERS_KEPT_ACROSS_ORIGINS = frozenset(
    {"accept", "accept-language", "user-agent", "content-type"}
)


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return (url.scheme, url.raw_host, url.port or _DEFAULT_PORTS.get(url.scheme))


def _next_hop(
    response: httpx.Response, first: httpx.Request, caller_headers: Mapping[str, str] | None
) -> httpx.Request:
    request = response.next_request
    assert request is not None  # only called for redirects
    if caller_headers and _origin(request.url) != _origin(first.url):
        for name in caller_headers:
            if name.lower() not in _HEADERS_KEPT_ACROSS_ORIGINS:
                request.headers.pop(name, None)
    return request


def _too_large(shown: str, max_bytes: int) -> EgressError:
    return EgressError(f"the response from {shown} is larger than the limit of {max_bytes:,} bytes")


def _declared_too_large(response: httpx.Response, max_bytes: int) -> bool:
    declared = response.headers.get("content-length", "")
    return declared.isdigit() and int(declared) > max_bytes


def _plain_reason(exc: BaseException) -> str:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"its TLS certificate could not be verified ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError):
            return f"the TLS handshake failed ({seen.reason or seen})"
        if isinstance(seen, ConnectionRefusedError):
            return "the connection was refused"
        seen = seen.__cause__ or seen.__context__
    return str(exc) or type(exc).__name__


def _failure(exc: Exception, shown: str, timeout: float) -> EgressError:
    """The EgressError for an httpx failure while requesting `shown`."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return EgressError(
            f"the request to {shown} took longer than the limit of {timeout:g} seconds"
        )
    if isinstance(exc, httpx.ConnectError):
        return EgressError(f"could not connect to {shown}: {_plain_reason(exc)}")
    if isinstance(exc, httpx.RemoteProtocolError):
        return EgressError(f"{shown} sent a response that is not valid HTTP ({exc})")
    return EgressError(f"the request to {shown} failed: {_plain_reason(exc)}")


class _Hops:
    """Where a fetch is in its redirect chain, for messages."""

    def __init__(self, url: str | httpx.URL) -> None:
        self.first = _display(str(url))
        self.current = self.first
        self.count = 0

    def advance(self, request: httpx.Request, max_redirects: int) -> None:
        if self.count >= max_redirects:
            raise EgressError(f"{self.first} redirected more than {max_redirects} times")
        self.count += 1
        self.current = _display(str(request.url))

    def denied(self, exc: EgressDenied) -> EgressDenied:
        if self.count == 0:
            return exc
        return EgressDenied(exc.url, exc.reason, self.first)


def _check_arguments(timeout: float, max_bytes: int, max_redirects: int) -> None:
    if not timeout > 0:
        raise ValueError("timeout must be a positive number of seconds")
    if max_bytes < 0 or max_redirects < 0:
        raise ValueError("max_bytes and max_redirects must not be negative")


async def afetch(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | str | None = None,
    json: Any = None,
    timeout: float = 10.0,  # noqa: ASYNC109 - a per-request budget, enforced with fail_after
    max_bytes: int = 1_000_000,
    max_redirects: int = 5,
) -> EgressResponse:
    """Send one request and read the whole response, following up to `max_redirects` redirects.

    `timeout` bounds everything (lookups, connects, redirects, the body); the body is streamed and
    abandoned as soon as it exceeds `max_bytes` (Content-Length is not trusted). Headers the caller
    set, other than Accept/Accept-Language/User-Agent/Content-Type, are dropped when a redirect
    leaves the first URL's origin. Non-2xx statuses are returned, not raised.

    Raises EgressDenied when the URL or a redirect target may not be requested, EgressError when
    the request fails (timeout, too large, DNS, connection, invalid response).
    """
    _check_arguments(timeout, max_bytes, max_redirects)
    _inspect(url)  # refuse early, with the caller's spelling of the URL in the message
    hops = _Hops(url)
    try:
        with anyio.fail_after(timeout):
            async with guarded_async_client(timeout=timeout) as client:
                request = client.build_request(
                    method, url, headers=headers, content=content, json=json
                )
                first = request
                while True:
                    try:
                        response = await client.send(request, stream=True)
                    except EgressDenied as exc:
                        raise hops.denied(exc)
                    try:
                        if response.next_request is not None:
                            request = _next_hop(response, first, headers)
                            hops.advance(request, max_redirects)
                            continue
                        if _declared_too_large(response, max_bytes):
                            raise _too_large(hops.current, max_bytes)
                        body = bytearray()
                        async for chunk in response.aiter_bytes():
                            body += chunk
                            if len(body) > max_bytes:
                                raise _too_large(hops.current, max_bytes)
                        return _response(response, bytes(body))
                    finally:
                        await response.aclose()
    except (httpx.HTTPError, TimeoutError) as exc:
        raise _failure(exc, hops.current, timeout)


def fetch(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | str | None = None,
    json: Any = None,
    timeout: float = 10.0,
    max_bytes: int = 1_000_000,
    max_redirects: int = 5,
) -> EgressResponse:
    """The sync `afetch`, for Celery tasks and sync views; same arguments, same errors."""
    _check_arguments(timeout, max_bytes, max_redirects)
    _inspect(url)
    hops = _Hops(url)
    deadline = _DEADLINE.set(time.monotonic() + timeout)
    try:
        with guarded_client(timeout=timeout) as client:
            request = client.build_request(method, url, headers=headers, content=content, json=json)
            first = request
            while True:
                try:
                    response = client.send(request, stream=True)
                except EgressDenied as exc:
                    raise hops.denied(exc)
                try:
                    if response.next_request is not None:
                        request = _next_hop(response, first, headers)
                        hops.advance(request, max_redirects)
                        continue
                    if _declared_too_large(response, max_bytes):
                        raise _too_large(hops.current, max_bytes)
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > max_bytes:
                            raise _too_large(hops.current, max_bytes)
                    return _response(response, bytes(body))
                finally:
                    response.close()
    except (httpx.HTTPError, TimeoutError) as exc:
        raise _failure(exc, hops.current, timeout)
    finally:
        _DEADLINE.reset(deadline)


def _response(response: httpx.Response, content: bytes) -> EgressResponse:
    return EgressResponse(
        status_code=response.status_code,
        headers=response.headers,
        content=content,
        url=str(response.url),
    )
