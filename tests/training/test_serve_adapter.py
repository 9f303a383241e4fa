"""Closing the loop offline: ``serve_adapter`` serves a version's local LoRA adapter and can
point the project's proxy at it (through ``project_upstream_set``)."""

from __future__ import annotations

import json
import threading
import urllib.request
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from base import services as base_services
from base.errors import DomainError, PermissionDenied
from base.models import AuditEvent, Project
from skills.versions import services as skill_services
from tests import factories
from training.backends import serving

pytestmark = pytest.mark.django_db


def _adapter_version(project, adapter_ref: str, base_model: str = "tiny-random-smollm2"):
    candidate = skill_services.policy_version_create_candidate(
        project=project, adapter_ref=adapter_ref, base_model=base_model, changelog="adapter"
    )
    return skill_services.policy_version_promote(version=candidate, actor=None, actor_label="test")


def _upstream_events(project) -> list[tuple[dict, dict]]:
    return list(
        AuditEvent.objects.filter(project=project, action="project.upstream.update")
        .order_by("created_at", "id")
        .values_list("before", "after")
    )


# --- project_upstream_set -------------------------------------------------------------------


def test_setting_the_upstream_writes_it_and_an_audit_event(project):
    base_services.project_upstream_set(
        project=project, base_url="http://127.0.0.1:8100/v1/", actor_label="serve_adapter"
    )

    project.refresh_from_db()
    assert project.upstream_base_url == "http://127.0.0.1:8100/v1"
    assert _upstream_events(project) == [
        ({"upstream_base_url": ""}, {"upstream_base_url": "http://127.0.0.1:8100/v1"})
    ]
    # The same URL again changes nothing and records nothing.
    base_services.project_upstream_set(project=project, base_url="http://127.0.0.1:8100/v1")
    assert len(_upstream_events(project)) == 1


@pytest.mark.parametrize("bad", ["not a url", "ftp://127.0.0.1/v1"])
def test_setting_the_upstream_refuses_a_bad_url_and_changes_nothing(project, bad):
    with pytest.raises(DomainError):
        base_services.project_upstream_set(project=project, base_url=bad)

    assert Project.objects.get(pk=project.pk).upstream_base_url == ""
    assert _upstream_events(project) == []


def test_setting_the_upstream_needs_an_admin(project):
    viewer = factories.make_member(project, role="viewer")

    with pytest.raises(PermissionDenied):
        base_services.project_upstream_set(
            project=project, base_url="http://x.test/v1", actor=viewer
        )

    assert Project.objects.get(pk=project.pk).upstream_base_url == ""


# --- the command's refusals -----------------------------------------------------------------


def test_serve_adapter_refuses_an_unknown_project():
    with pytest.raises(CommandError, match="No project"):
        call_command("serve_adapter", "no-such-project")


def test_serve_adapter_refuses_a_version_that_does_not_exist(project):
    # A version without an adapter serves its base model: see test_serving_names.py.
    with pytest.raises(CommandError, match="no version 7"):
        call_command("serve_adapter", project.slug, "--version", "7")


def test_serve_adapter_refuses_an_adapter_that_is_not_a_local_folder(project, tmp_path):
    _adapter_version(project, "tinker://run-1/sampler_weights/final")
    with pytest.raises(CommandError, match="not a local folder"):
        call_command("serve_adapter", project.slug, "--set-upstream")

    _adapter_version(project, str(tmp_path / "gone"))
    with pytest.raises(CommandError, match="not a local folder"):
        call_command("serve_adapter", project.slug, "--version", "2")

    assert Project.objects.get(pk=project.pk).upstream_base_url == ""


# --- a real server on the tiny model --------------------------------------------------------


@pytest.fixture
def tiny_adapter(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from training.backends.local import _quiet_peft, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-random-smollm2")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    folder = tmp_path / "runs" / "7" / "adapter"
    with _quiet_peft():
        peft.get_peft_model(model, lora).save_pretrained(str(folder))
    return folder


def test_serve_adapter_serves_the_active_adapter_and_points_the_proxy_at_it(
    project, tiny_adapter, monkeypatch
):
    project.upstream_base_url = "http://cloud.test/v1"
    project.save(update_fields=["upstream_base_url"])
    _adapter_version(project, str(tiny_adapter))
    started: list[serving.ModelServer] = []
    seen: dict = {}
    real_make_server = serving.make_server

    def make_server(*args, **kwargs):
        server = real_make_server(*args, **kwargs)
        started.append(server)
        threading.Thread(target=client, args=(server,), daemon=True).start()
        return server

    def client(server: serving.ModelServer) -> None:
        try:
            # The proxy is switched before serving starts; the request waits for the loop.
            with urllib.request.urlopen(f"{server.url}/models", timeout=30) as response:
                seen["models"] = json.load(response)
        finally:
            server.shutdown()

    def upstream_while_serving(**kwargs):
        result = services_upstream_set(**kwargs)
        seen.setdefault("upstream", kwargs["base_url"])
        return result

    services_upstream_set = base_services.project_upstream_set
    monkeypatch.setattr(serving, "make_server", make_server)
    monkeypatch.setattr(base_services, "project_upstream_set", upstream_while_serving)
    out = StringIO()

    call_command("serve_adapter", project.slug, "--port", "0", "--set-upstream", stdout=out)

    url = started[0].url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
    assert f"Serving v2 at {url}" in out.getvalue()
    assert seen["models"]["data"][0]["id"] == "7"
    assert seen["upstream"] == url
    # Stopping the server gives the proxy its old upstream back.
    assert Project.objects.get(pk=project.pk).upstream_base_url == "http://cloud.test/v1"
    assert _upstream_events(project) == [
        ({"upstream_base_url": "http://cloud.test/v1"}, {"upstream_base_url": url}),
        ({"upstream_base_url": url}, {"upstream_base_url": "http://cloud.test/v1"}),
    ]
