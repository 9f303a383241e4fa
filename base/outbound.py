"""Outbound HTTP to addresses that people type in (a project's Slack and webhook URLs, a Slack
interaction's ``response_url``, a training calendar's iCal feed): one guard for all of them.

The guard allows http(s) only, resolves the host once, refuses the request when any address of
the host is loopback, private, link-local (cloud metadata), multicast, reserved or otherwise not
global (IPv4 and IPv6, IPv4 inside IPv6 too: mapped, 6to4, Teredo, NAT64), and then connects to
exactly an address it checked. ``PinnedTransport`` rewrites the URL's host to that IP and keeps
the name for the ``Host`` header and for TLS (SNI and certificate verification, through
httpcore's ``sni_hostname`` request extension), so a name that answers differently a moment
later (DNS rebinding) cannot reach loopback or the private network. Every request of a
``client()`` goes through it, redirects included, and proxies from the environment are not
used (a proxy would resolve the name again).

``settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS`` lifts the address check, never the scheme check:
the test suite's loopback receivers, and on-premise receivers on a private network.

Not guarded here, on purpose: addresses only the operator sets, in the environment or with a
management command: the LLM (``settings.LLM``), the runtime's upstream (``settings.UPSTREAM``
and a project's ``upstream_base_url``, set by ``serve_adapter``), Tinker, the SMTP server.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

USER_AGENT = "MetaClaw/1"
SCHEMES = ("http", "https")
TIMEOUT = httpx.Timeout(10.0, connect=3.0)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class OutboundRefused(httpx.RequestError):
    """The guard refused the request (a scheme other than http(s), or an address that is not
    public); retrying cannot help until the URL or the host's addresses change."""


def private_allowed() -> bool:
    return bool(getattr(settings, "METACLAW_ALLOW_PRIVATE_WEBHOOKS", False))


def address_refused(address: Address) -> bool:
    """Whether ``address`` is anything but a public unicast address. An IPv4 address carried
    inside an IPv6 one is checked as well: the IPv6 form can route to it."""
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            embedded.append(address.ipv4_mapped)
        if address.sixtofour is not None:
            embedded.append(address.sixtofour)
        if address.teredo is not None:
            embedded.extend(address.teredo)
        if address in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    for candidate in (address, *embedded):
        if (
            not candidate.is_global
            or candidate.is_loopback
            or candidate.is_private
            or candidate.is_link_local
            or candidate.is_multicast
            or candidate.is_reserved
            or candidate.is_unspecified
        ):
            return True
    return False


def _resolve(host: str, port: int) -> list[str]:
    """The host's addresses, in the resolver's order, without duplicates. Raises ``OSError``
    (``socket.gaierror``) when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%", 1)[0]  # a scope id ("fe80::1%eth0") is not an address
        if address not in addresses:
            addresses.append(address)
    return addresses


def checked_addresses(host: str, port: int) -> list[str]:
    """Resolve ``host`` once and check every address it has. Returns them (connect only to
    these); raises ``OutboundRefused`` when one is not public (unless private addresses are
    allowed), ``httpx.ConnectError`` when the name does not resolve (that may pass)."""
    try:
        addresses = _resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise httpx.ConnectError(f"The host {host} could not be resolved ({exc}).") from exc
    if not addresses:
        raise httpx.ConnectError(f"The host {host} could not be resolved.")
    if private_allowed():
        return addresses
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            message = f"The host {host} has an address that cannot be checked."
            raise OutboundRefused(message) from None
        if address_refused(address):
            raise OutboundRefused(
                f"The host {host} resolves to a loopback, private, link-local or reserved "
                f"address ({address}); only public addresses are allowed."
            )
    return addresses


def _host_and_port(url: str) -> tuple[str, int]:
    """The URL's host (ASCII, IDNA-encoded) and port; raises ``OutboundRefused`` for a scheme
    other than http(s), a missing host or a bad port."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise OutboundRefused(f"The URL is not valid ({exc}).") from exc
    return _target(parsed)


def _target(url: httpx.URL) -> tuple[str, int]:
    if url.scheme not in SCHEMES:
        raise OutboundRefused("Only http(s) URLs are allowed.")
    host = url.raw_host.decode("ascii")
    if not host:
        raise OutboundRefused("The URL has no host.")
    port = url.port or (443 if url.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise OutboundRefused("The URL has an invalid port.")
    return host, port


def url_refusal(url: str) -> str | None:
    """Why a request to ``url`` would be refused, or None: the check ``client()`` makes on
    every request, made ahead of time where the URL is set (settings forms, the API), so a
    person hears of it at once. A name that does not resolve is refused here too, unless
    private addresses are allowed (then only the scheme and the host's presence are checked:
    the name may resolve only on the worker's network)."""
    try:
        target = _host_and_port(url)
        if not private_allowed():
            checked_addresses(*target)
    except OutboundRefused as exc:
        return str(exc)
    except httpx.ConnectError:
        return f"The host {urlsplit(url).hostname} could not be resolved."
    return None


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport that checks each request's host (``checked_addresses``) and connects
    to a checked IP, never to the name: the request that goes out has the IP in its URL, the
    original ``Host`` header, and the name as TLS server name (SNI and certificate check).
    When a connection to one address fails, the host's next checked address is tried."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host, port = _target(request.url)
        addresses = checked_addresses(host, port)
        extensions = dict(request.extensions)
        try:
            ipaddress.ip_address(host)
        except ValueError:  # a name: TLS must verify it, not the IP we connect to
            extensions["sni_hostname"] = host
        failure: httpx.ConnectError | None = None
        for address in addresses:
            pinned = httpx.Request(
                method=request.method,
                url=request.url.copy_with(host=address),
                headers=request.headers,  # Host: the original name (set when it was built)
                stream=request.stream,
                extensions=extensions,
            )
            try:
                return super().handle_request(pinned)
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure


def client(
    *,
    timeout: httpx.Timeout | float = TIMEOUT,
    follow_redirects: bool = False,
    max_redirects: int = 3,
    headers: dict[str, str] | None = None,
    **transport_options: Any,
) -> httpx.Client:
    """An ``httpx.Client`` whose every request (and redirect) goes through ``PinnedTransport``.
    ``transport_options`` go to the transport (``verify``, ``retries``...). Connections are
    not kept alive: a connection is made for one host name, TLS-checked for that name, and
    must not carry a redirect to another name that happens to share its address."""
    transport_options.setdefault("limits", httpx.Limits(max_keepalive_connections=0))
    return httpx.Client(
        transport=PinnedTransport(**transport_options),
        timeout=timeout,
        follow_redirects=follow_redirects,
        max_redirects=max_redirects,
        headers={"User-Agent": USER_AGENT, **(headers or {})},
        trust_env=False,
    )


def get_bytes(
    url: str, *, max_bytes: int, timeout: float = 10.0, headers: dict[str, str] | None = None
) -> bytes:
    """GET ``url`` through the guard (following up to 3 redirects, each checked) and return
    the body. Raises ``OutboundRefused``, ``httpx.HTTPError`` for a network error or a status
    other than 2xx, and ``ValueError`` for a body longer than ``max_bytes``."""
    with client(timeout=httpx.Timeout(timeout, connect=3.0), follow_redirects=True) as http:
        with http.stream("GET", url, headers=headers) as response:
            response.raise_for_status()
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    raise ValueError(f"The answer is larger than {max_bytes:,} bytes.")
    return bytes(body)
