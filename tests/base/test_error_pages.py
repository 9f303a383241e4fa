"""Pages for a missing address and a server error, in the site's layout, with its favicon."""

from __future__ import annotations

import pytest
from django.test import RequestFactory
from django.views.defaults import server_error

from tests import factories

pytestmark = pytest.mark.django_db


def test_a_missing_page_is_a_404_in_the_sites_layout(client, settings, project):
    settings.DEBUG = False
    client.force_login(factories.make_member(project, "viewer"))
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    html = response.content.decode()
    assert "<h1>Not found</h1>" in html and 'class="brand"' in html
    assert "metaclaw/favicon.svg" in html
    assert "Back to MetaClaw" in html


def test_a_server_error_page_needs_no_database_and_keeps_the_layout(settings):
    settings.DEBUG = False
    response = server_error(RequestFactory().get("/boom/"))
    assert response.status_code == 500
    html = response.content.decode()
    assert "Something went wrong" in html and "metaclaw/favicon.svg" in html
    assert "nothing you sent was lost" in html


def test_the_favicon_is_served(client):
    response = client.get("/static/metaclaw/favicon.svg")
    assert response.status_code == 200
    assert b"<svg" in b"".join(response.streaming_content)
