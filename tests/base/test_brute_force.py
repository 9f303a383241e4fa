"""Guessing API keys and passwords (base.auth): wrong API keys from one address are answered 429
after a limit, wrong passwords lock one username and address out for a while, and a guess made
while blocked is never checked."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from base import auth, counters
from tests import factories

pytestmark = pytest.mark.django_db

ATTACKER = "203.0.113.9"
NEIGHBOUR = "198.51.100.20"
LIST = "/api/v1/incidents"


@pytest.fixture
def limits(settings):
    settings.METACLAW = {
        **settings.METACLAW,
        "API_KEY_FAILURES_LIMIT": 3,
        "API_KEY_FAILURES_WINDOW_SECONDS": 60,
        "LOGIN_FAILURES_LIMIT": 3,
        "LOGIN_LOCKOUT_SECONDS": 900,
        "CLIENT_IP_HEADER": "",
    }
    return settings.METACLAW


@pytest.fixture
def later(monkeypatch):
    """Move the throttles' clock forward by ``seconds``."""

    def move(seconds: float) -> None:
        now = time.time() + seconds
        monkeypatch.setattr(counters, "time", SimpleNamespace(time=lambda: now))

    return move


def get(client, key: str, ip: str = ATTACKER, **headers):
    return client.get(LIST, HTTP_AUTHORIZATION=f"Bearer {key}", REMOTE_ADDR=ip, **headers)


def wrong_key(n: int) -> str:
    return f"mc_0000{n:04d}_not-a-real-secret-{n}"


# --- API keys -----------------------------------------------------------------------------------


def test_wrong_api_keys_are_answered_429_with_retry_after_once_the_limit_is_reached(
    client, limits, ingest_key
):
    answers = [get(client, wrong_key(n)) for n in range(4)]

    assert [a.status_code for a in answers] == [401, 401, 401, 429]
    throttled = answers[-1]
    assert throttled["Content-Type"].startswith("application/json")
    assert 1 <= int(throttled["Retry-After"]) <= 60
    body = throttled.json()
    assert body["code"] == "rate_limited"
    assert body["retry_after"] == int(throttled["Retry-After"])
    assert "invalid API key" in body["detail"]


def test_a_blocked_address_is_refused_before_any_key_is_looked_at(
    client, limits, ingest_key, django_assert_num_queries
):
    for n in range(3):
        get(client, wrong_key(n))

    # Even the right key: a guess made while blocked must not be checked (no database query),
    # or blocking would not slow guessing down.
    with django_assert_num_queries(0):
        assert get(client, ingest_key).status_code == 429


def test_other_addresses_are_not_blocked_by_one_guesser(client, limits, ingest_key):
    for n in range(5):
        get(client, wrong_key(n))

    assert get(client, ingest_key, ip=NEIGHBOUR).status_code == 200
    assert get(client, ingest_key, ip="2001:db8::1").status_code == 200


def test_the_block_ends_after_the_window(client, limits, ingest_key, later):
    for n in range(4):
        get(client, wrong_key(n))

    later(61)

    assert get(client, ingest_key).status_code == 200
    assert get(client, wrong_key(9)).status_code == 401  # a new window counts from zero


def test_valid_keys_do_not_reset_the_count_of_wrong_ones(client, limits, ingest_key):
    get(client, wrong_key(1))
    get(client, wrong_key(2))
    assert get(client, ingest_key).status_code == 200

    assert get(client, wrong_key(3)).status_code == 401
    assert get(client, ingest_key).status_code == 429


def test_behind_a_proxy_the_configured_headers_last_address_is_counted(client, limits, ingest_key):
    limits["CLIENT_IP_HEADER"] = "X-Forwarded-For"
    proxy = "10.0.0.2"
    for n in range(3):  # a forged first entry changes nothing: the proxy wrote the last one
        get(client, wrong_key(n), ip=proxy, HTTP_X_FORWARDED_FOR=f"1.1.1.{n}, {ATTACKER}")

    assert get(client, ingest_key, ip=proxy, HTTP_X_FORWARDED_FOR=ATTACKER).status_code == 429
    assert get(client, ingest_key, ip=proxy, HTTP_X_FORWARDED_FOR=NEIGHBOUR).status_code == 200


def test_ipv6_clients_are_counted_by_their_64():
    request = SimpleNamespace(headers={}, META={"REMOTE_ADDR": "2001:db8:1:2:aaaa::1"})
    neighbour = SimpleNamespace(headers={}, META={"REMOTE_ADDR": "2001:db8:1:2:bbbb::7"})
    mapped = SimpleNamespace(headers={}, META={"REMOTE_ADDR": "::ffff:203.0.113.9"})

    assert auth.client_ip(request) == auth.client_ip(neighbour) == "2001:db8:1:2::/64"
    assert auth.client_ip(mapped) == ATTACKER


def test_a_cache_outage_blocks_nobody(client, limits, ingest_key, monkeypatch):
    def down(*args, **kwargs):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(counters.cache, "get", down)
    monkeypatch.setattr(counters.cache, "incr", down)

    assert [get(client, wrong_key(n)).status_code for n in range(5)] == [401] * 5
    assert get(client, ingest_key).status_code == 200


# --- Logins -------------------------------------------------------------------------------------


@pytest.fixture
def alice(db):
    return factories.make_user("alice", password="the-right-password-1")


def login(client, password: str, username: str = "alice", ip: str = ATTACKER):
    return client.post("/login/", {"username": username, "password": password}, REMOTE_ADDR=ip)


def errors(response) -> str:
    return " ".join(response.context["form"].non_field_errors())


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


def test_repeated_wrong_passwords_lock_the_username_out_with_a_form_error(client, limits, alice):
    first, second, third = (login(client, f"guess-{n}") for n in range(3))
    right = login(client, "the-right-password-1")

    assert first.status_code == second.status_code == 200
    assert "correct username and password" in errors(first)
    assert third.status_code == right.status_code == 200
    assert "Too many failed logins" in errors(third)
    assert "Wait 15 minutes" in errors(right)
    assert not logged_in(client)


def test_a_locked_out_username_can_still_log_in_from_another_address(client, limits, alice):
    for n in range(3):
        login(client, f"guess-{n}")

    response = login(client, "the-right-password-1", ip=NEIGHBOUR)

    assert response.status_code == 302 and logged_in(client)


def test_the_lockout_is_per_username(client, limits, alice):
    factories.make_user("bob", password="bobs-password-123")
    for n in range(3):
        login(client, f"guess-{n}")

    assert login(client, "bobs-password-123", username="bob").status_code == 302


def test_usernames_differing_only_in_case_share_one_count(client, limits, alice):
    login(client, "guess-1", username="alice")
    login(client, "guess-2", username="ALICE")

    assert "Too many failed logins" in errors(login(client, "guess-3", username="Alice"))


def test_the_lockout_ends_and_a_successful_login_resets_the_count(client, limits, alice, later):
    for n in range(3):
        login(client, f"guess-{n}")
    later(901)

    assert login(client, "the-right-password-1").status_code == 302
    client.logout()
    # Counted from zero again: two more failures do not lock the account.
    assert "correct username and password" in errors(login(client, "guess-a"))
    assert "correct username and password" in errors(login(client, "guess-b"))
    assert login(client, "the-right-password-1").status_code == 302


def test_a_successful_login_before_the_limit_clears_the_earlier_failures(client, limits, alice):
    login(client, "guess-1")
    login(client, "guess-2")
    assert login(client, "the-right-password-1").status_code == 302
    client.logout()

    assert "correct username and password" in errors(login(client, "guess-3"))
    assert "correct username and password" in errors(login(client, "guess-4"))


def test_the_admin_login_is_locked_out_too(client, limits, alice):
    for n in range(3):
        client.post(
            "/admin/login/", {"username": "alice", "password": f"guess-{n}"}, REMOTE_ADDR=ATTACKER
        )

    response = client.post(
        "/admin/login/",
        {"username": "alice", "password": "the-right-password-1"},
        REMOTE_ADDR=ATTACKER,
    )

    assert "Too many failed logins" in " ".join(response.context["form"].non_field_errors())


@pytest.mark.django_db(transaction=True)  # the fast lane looks keys up on a worker thread
def test_the_fast_lane_throttles_wrong_keys_like_the_django_door(limits, ingest_key):
    from asgiref.sync import async_to_sync

    from base.fast_lane import fast_lane
    from incidents.fast_lane import ROUTES

    async def django_app(scope, receive, send):
        raise AssertionError(f"{scope['path']} was served by Django")

    def post(key: str, ip: str) -> tuple[int, dict[str, str], bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = {"host": "testserver", "authorization": f"Bearer {key}"}
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/api/v1/incidents",
            "query_string": b"",
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            "server": ("testserver", 80),
            "client": (ip, 40000),
        }
        async_to_sync(fast_lane(django_app, ROUTES))(scope, receive, send)
        return (
            sent[0]["status"],
            {k.decode(): v.decode() for k, v in sent[0]["headers"]},
            sent[1]["body"],
        )

    answers = [post(wrong_key(n), ATTACKER) for n in range(4)]
    assert [status for status, _, _ in answers] == [401, 401, 401, 429]
    status, headers, body = answers[-1]
    assert 1 <= int(headers["retry-after"]) <= 60 and b"rate_limited" in body
    # The real key from the blocked address is refused too; a neighbour is not blocked.
    assert post(ingest_key, ATTACKER)[0] == 429
    assert post(ingest_key, NEIGHBOUR)[0] == 422  # admitted: the empty body is refused
    # The block is shared: the Django door refuses the same address.
    assert auth.api_key_blocked(ATTACKER) > 0
