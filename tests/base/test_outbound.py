"""The outbound guard (base.outbound): http(s) only, public addresses only, and the connection
goes to the address that was checked, even when the name answers differently a moment later
(DNS rebinding). The name resolver is played by a function that changes its answer; connections
to "public" addresses are redirected to loopback servers, so nothing leaves the machine."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from base import outbound
from skills.approvals import delivery
from tests import factories
from tests.fakes.slack_server import SlackFake
from training.policy import services as policy_services
from training.policy.models import IdleWindowPolicy

NAME = "hooks.example.test"
PUBLIC = "93.184.216.34"  # a public address no test really connects to
OTHER_PUBLIC = "93.184.216.35"

ICAL = (
    "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//EN\r\nBEGIN:VEVENT\r\nUID:quiet-1\r\n"
    "DTSTART:20260105T010000Z\r\nDTEND:20260105T050000Z\r\nSUMMARY:Quiet\r\nEND:VEVENT\r\n"
    "END:VCALENDAR\r\n"
)

_real_getaddrinfo = socket.getaddrinfo
_real_create_connection = socket.create_connection


class Receiver:
    """A loopback HTTP(S) server that records what reaches it and answers from a table:
    ``answers[path] = (status, headers, body)``; 200 "ok" otherwise."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.answers: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.server_names: list[str | None] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                receiver.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": self.rfile.read(length),
                    }
                )
                status, headers, body = receiver.answers.get(self.path, (200, {}, b"ok"))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:

            def remember_sni(sock: ssl.SSLSocket, name: str | None, context: Any) -> None:
                receiver.server_names.append(name)

            tls.sni_callback = remember_sni
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


class Network:
    """The resolver and the connections, as the tests want them: ``answers`` are the
    resolver's successive answers for ``NAME`` (the last one repeats); ``routes`` send a
    connection to a public address to a loopback port instead (unrouted public addresses are
    refused). Records every lookup of ``NAME`` and every connection attempt."""

    def __init__(self) -> None:
        self.answers: list[str] = []
        self.lookups = 0
        self.routes: dict[str, int] = {}
        self.connections: list[tuple[str, int]] = []

    def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list:
        if host in (NAME, NAME.encode()):
            answer = self.answers[min(self.lookups, len(self.answers) - 1)]
            self.lookups += 1
            return _real_getaddrinfo(answer, port, *args, **kwargs)
        return _real_getaddrinfo(host, port, *args, **kwargs)

    def create_connection(self, address: tuple, *args: Any, **kwargs: Any) -> socket.socket:
        host, port = address[0], address[1]
        self.connections.append((host, port))
        if host == NAME:  # the name itself: whatever it resolves to now (the old, unsafe way)
            host = self.getaddrinfo(NAME, port)[0][4][0]
        if host in self.routes:
            return _real_create_connection(("127.0.0.1", self.routes[host]), *args, **kwargs)
        if host.startswith("127."):
            return _real_create_connection((host, port), *args, **kwargs)
        raise ConnectionRefusedError(f"test network: no route to {host}")


@pytest.fixture
def network(monkeypatch) -> Network:
    net = Network()
    monkeypatch.setattr(socket, "getaddrinfo", net.getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", net.create_connection)
    return net


@pytest.fixture
def guarded(settings):
    """The guard as in production: loopback and private addresses refused."""
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = False


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


# --- Which addresses and URLs are refused -------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8000/hook",
        "http://2130706433/hook",  # 127.0.0.1, written as one number
        "http://0x7f.1/hook",
        "http://0.0.0.0/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.0.10/hook",
        "http://100.64.0.1/hook",  # carrier-grade NAT
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://224.0.0.1/hook",
        "http://240.0.0.1/hook",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "http://[ff02::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",  # IPv4-mapped
        "http://[::ffff:169.254.169.254]/hook",
        "http://[2002:7f00:1::1]/hook",  # 6to4 around 127.0.0.1
        "http://[64:ff9b::a00:1]/hook",  # NAT64 around 10.0.0.1
    ],
)
def test_loopback_private_link_local_multicast_and_reserved_addresses_are_refused(guarded, url):
    refusal = outbound.url_refusal(url)

    assert refusal is not None and "only public addresses are allowed" in refusal
    with pytest.raises(outbound.OutboundRefused), outbound.client() as http:
        http.get(url)


def test_a_public_address_is_allowed(guarded):
    assert outbound.url_refusal(f"https://{PUBLIC}/hook") is None
    assert outbound.url_refusal("https://[2606:2800:220:1:248:1893:25c8:1946]/hook") is None


@pytest.mark.parametrize(
    "url", ["ftp://example.com/calendar.ics", "file:///etc/passwd", "gopher://example.com/"]
)
def test_only_http_and_https_are_allowed_even_where_private_addresses_are(settings, url):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True

    assert outbound.url_refusal(url) == "Only http(s) URLs are allowed."
    with pytest.raises(outbound.OutboundRefused, match="Only http"), outbound.client() as http:
        http.get(url)


def test_a_name_with_one_private_address_among_public_ones_is_refused(
    guarded, network, monkeypatch
):
    def two_answers(host, port, *args, **kwargs):
        if host == NAME:
            return [
                *_real_getaddrinfo(PUBLIC, port, *args, **kwargs),
                *_real_getaddrinfo("10.0.0.7", port, *args, **kwargs),
            ]
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_answers)

    assert "10.0.0.7" in outbound.url_refusal(f"http://{NAME}/hook")


# --- DNS rebinding: the connection goes to the checked address ----------------------------------


def test_a_name_that_rebinds_to_loopback_after_the_check_is_never_reached_on_loopback(
    guarded, network
):
    """Public when checked, 127.0.0.1 when connecting: the webhook goes to the checked public
    address (here: refused by the test network), never to the loopback receiver."""
    with SlackFake(webhook_secret="s") as internal:
        port = int(internal.base_url.rsplit(":", 1)[1])
        network.answers = [PUBLIC, "127.0.0.1"]

        with pytest.raises(delivery.DeliveryError) as failure:
            delivery.webhook_post(f"http://{NAME}:{port}/hook", "s", {"event": "test"})

        assert not isinstance(failure.value, delivery.PermanentDeliveryError)  # retried later
        assert internal.posts == []
    assert network.lookups == 1
    assert network.connections == [(PUBLIC, port)]


def test_the_unguarded_way_reached_loopback_with_the_same_resolver(guarded, network):
    """What the guard prevents: checking the name, then letting the client resolve it again."""
    with SlackFake(webhook_secret="s") as internal:
        port = int(internal.base_url.rsplit(":", 1)[1])
        network.answers = [PUBLIC, "127.0.0.1"]
        url = f"http://{NAME}:{port}/hook"

        assert outbound.url_refusal(url) is None  # the check alone passes...
        httpx.post(url, content=b"{}", trust_env=False)  # ...and the request reaches loopback

        assert len(internal.posts) == 1


def test_the_pinned_connection_keeps_the_host_header_path_and_body(guarded, network, receiver):
    network.answers = [PUBLIC, "127.0.0.1"]
    network.routes[PUBLIC] = receiver.port  # the public host's server

    delivery.webhook_post(f"http://{NAME}:8080/hook?x=1", "secret", {"event": "ping"})

    (request,) = receiver.requests
    assert request["path"] == "/hook?x=1"
    assert request["headers"]["Host"] == f"{NAME}:8080"
    assert request["headers"]["User-Agent"] == delivery.USER_AGENT
    assert request["headers"]["X-MetaClaw-Signature"].startswith("sha256=")
    assert request["body"] == b'{"event":"ping"}'
    assert network.lookups == 1 and network.connections == [(PUBLIC, 8080)]


def test_a_refused_address_at_send_time_is_a_permanent_failure_naming_the_host(guarded, network):
    network.answers = ["169.254.169.254"]

    with pytest.raises(delivery.PermanentDeliveryError, match="Refused to send to hooks"):
        delivery.webhook_post(f"http://{NAME}/hook", "", {"event": "ping"})
    assert network.connections == []


def test_when_one_checked_address_refuses_the_next_checked_one_is_tried(
    guarded, network, receiver, monkeypatch
):
    def two_public(host, port, *args, **kwargs):
        if host == NAME:
            return [
                *_real_getaddrinfo(OTHER_PUBLIC, port, *args, **kwargs),
                *_real_getaddrinfo(PUBLIC, port, *args, **kwargs),
            ]
        return _real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", two_public)
    network.routes[PUBLIC] = receiver.port

    with outbound.client() as http:
        assert http.get(f"http://{NAME}/").status_code == 200
    assert network.connections == [(OTHER_PUBLIC, 80), (PUBLIC, 80)]


def test_a_redirect_to_a_private_address_is_refused_before_connecting(guarded, network):
    with Receiver() as public_host, Receiver() as internal:
        public_host.answers["/feed.ics"] = (
            302,
            {"Location": f"http://127.0.0.1:{internal.port}/secret"},
            b"",
        )
        network.answers = [PUBLIC]
        network.routes[PUBLIC] = public_host.port

        with pytest.raises(outbound.OutboundRefused, match="127.0.0.1"):
            outbound.get_bytes(f"http://{NAME}/feed.ics", max_bytes=1000)

        assert len(public_host.requests) == 1
        assert internal.requests == []


# --- TLS: the name is verified, not the IP connected to ------------------------------------------


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, Path]:
    """Self-signed certificates for NAME and for another name (the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    made = {}
    for label, name in (("right", NAME), ("wrong", "elsewhere.example.test")):
        key, cert = folder / f"{label}.key", folder / f"{label}.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-addext",
                f"subjectAltName=DNS:{name}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],  # fmt: skip
            check=True,
            capture_output=True,
        )
        made[label], made[f"{label}_key"] = cert, key
    return made


def _tls_receiver(certificates: dict[str, Path], label: str) -> Receiver:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates[label], certificates[f"{label}_key"])
    return Receiver(tls=context)


def test_tls_sends_the_name_as_sni_and_verifies_the_certificate_for_the_name(
    settings, network, certificates
):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True  # the receiver is on loopback
    trust = ssl.create_default_context(cafile=str(certificates["right"]))
    with _tls_receiver(certificates, "right") as tls_host:
        network.answers = ["127.0.0.1"]

        with outbound.client(verify=trust) as http:
            response = http.get(f"https://{NAME}:{tls_host.port}/hook")

        assert response.status_code == 200
        assert tls_host.server_names == [NAME]
        assert tls_host.requests[0]["headers"]["Host"] == f"{NAME}:{tls_host.port}"
    assert network.connections == [("127.0.0.1", tls_host.port)]


def test_tls_refuses_a_certificate_for_another_name(settings, network, certificates):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True
    trust = ssl.create_default_context(cafile=str(certificates["wrong"]))
    with _tls_receiver(certificates, "wrong") as tls_host:
        network.answers = ["127.0.0.1"]

        with (
            pytest.raises(httpx.ConnectError, match="certificate"),
            outbound.client(verify=trust) as http,
        ):
            http.get(f"https://{NAME}:{tls_host.port}/hook")

        assert tls_host.requests == []


# --- The training calendar's feed ---------------------------------------------------------------


@pytest.fixture
def policy(project) -> IdleWindowPolicy:
    return IdleWindowPolicy.objects.create(project=project, ical_text="kept")


def test_the_calendar_feed_is_fetched_through_the_guard(settings, receiver, policy):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True
    receiver.answers["/team.ics"] = (200, {"Content-Type": "text/calendar"}, ICAL.encode())
    policy.ical_url = f"http://127.0.0.1:{receiver.port}/team.ics"

    policy_services.idle_policy_calendar_refresh(policy=policy)

    policy.refresh_from_db()
    assert policy.ical_text == ICAL and policy.ical_error == ""
    assert receiver.requests[0]["headers"]["Accept"] == "text/calendar"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://calendars.example.com/team.ics", "Only http(s) URLs are allowed."),
        ("http://127.0.0.1:9/team.ics", "only public addresses are allowed"),
        ("http://169.254.169.254/latest/meta-data/", "only public addresses are allowed"),
    ],
)
def test_a_calendar_feed_on_ftp_or_a_private_address_is_refused_and_shown(
    guarded, policy, url, error
):
    IdleWindowPolicy.objects.filter(pk=policy.pk).update(ical_url=url)  # stored before the check
    policy.refresh_from_db()

    policy_services.idle_policy_calendar_refresh(policy=policy)

    policy.refresh_from_db()
    assert error in policy.ical_error
    assert policy.ical_text == "kept" and policy.ical_fetched_at is not None


def test_a_calendar_feed_that_rebinds_to_loopback_is_not_fetched_from_loopback(
    guarded, network, receiver, policy
):
    receiver.answers["/team.ics"] = (200, {}, ICAL.encode())
    network.answers = [PUBLIC, "127.0.0.1"]
    IdleWindowPolicy.objects.filter(pk=policy.pk).update(
        ical_url=f"http://{NAME}:{receiver.port}/team.ics"
    )
    policy.refresh_from_db()

    policy_services.idle_policy_calendar_refresh(policy=policy)

    policy.refresh_from_db()
    assert receiver.requests == []
    assert policy.ical_text == "kept" and "no route" in policy.ical_error
    assert network.connections == [(PUBLIC, receiver.port)]


def test_a_calendar_feed_larger_than_the_limit_is_refused_not_cut(settings, receiver, policy):
    settings.METACLAW_ALLOW_PRIVATE_WEBHOOKS = True
    receiver.answers["/huge.ics"] = (200, {}, b"X" * 2_000_001)
    policy.ical_url = f"http://127.0.0.1:{receiver.port}/huge.ics"

    policy_services.idle_policy_calendar_refresh(policy=policy)

    policy.refresh_from_db()
    assert policy.ical_text == "kept" and "larger than" in policy.ical_error


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("ftp://calendars.example.com/team.ics", "http(s) URL"),
        ("http://10.0.0.8/team.ics", "only public addresses are allowed"),
    ],
)
def test_the_training_settings_refuse_an_ftp_or_private_calendar_url_naming_the_field(
    guarded, client, project, url, error
):
    client.force_login(factories.make_member(project, "admin"))
    form = factories.training_settings_form(timezone="UTC", ical_url=url)

    response = client.post(f"/p/{project.slug}/training/settings/", form)

    assert response.status_code == 422
    assert error in " ".join(response.context["form"].errors["ical_url"])
    assert not IdleWindowPolicy.objects.filter(project=project).exclude(ical_url="").exists()
