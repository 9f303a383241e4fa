"""Serving for comparison (issue 23): ``serve_adapter`` serves the base model of a version with
no adapter (or with ``--base``) for an A/B baseline, and the model name the proxy sends for a
local adapter is the name its server reports."""

from __future__ import annotations

import json
import threading
import urllib.request
from io import StringIO

import openai
import pytest
from django.core.management import CommandError, call_command

from incidents.models import Trajectory
from skills.runtime import admission, recording
from skills.runtime import policy as runtime_policy
from skills.runtime.upstream import adapter_model_name
from skills.versions import services as version_services
from tests import factories
from tests.asgi_server import asgi_server
from training.backends import serving
from training.policy import services as policy_services
from training.runs import selectors

TINY = "tiny-random-smollm2"


@pytest.mark.parametrize(
    ("ref", "name"),
    [
        ("/srv/metaclaw/var/training/runs/7/adapter", "7"),
        ("/srv/metaclaw/var/training/runs/7/adapter/", "7"),
        ("var/training/runs/12/adapter", "12"),
        ("/models/pirate-lora", "pirate-lora"),
        ("tinker://run-7/sampler_weights/final", "tinker://run-7/sampler_weights/final"),
    ],
)
def test_the_proxy_and_the_server_name_a_local_adapter_alike(monkeypatch, ref, name):
    """``make_server``'s own default (the module command's) and the proxy's rule agree."""
    monkeypatch.setattr(serving, "default_num_threads", lambda: 1)

    class Model:
        def eval(self) -> None:
            pass

    monkeypatch.setattr(serving, "load_model_and_tokenizer", lambda *a, **k: (Model(), None))

    assert adapter_model_name(ref) == name
    if "://" not in ref:
        server = serving.make_server(TINY, ref, "127.0.0.1", 0)
        server.server_close()
        assert server.model_id == name


# --- The command ----------------------------------------------------------------------------


@pytest.fixture
def tiny_adapter(tmp_path):
    pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from training.backends.local import _quiet_peft, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(TINY)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", task_type="CAUSAL_LM")
    folder = tmp_path / "training" / "runs" / "7" / "adapter"
    with _quiet_peft():
        peft.get_peft_model(model, lora).save_pretrained(str(folder))
    return folder


def _adapter_version(project, adapter_ref: str):
    candidate = version_services.policy_version_create_candidate(
        project=project, adapter_ref=adapter_ref, base_model=TINY, changelog="adapter"
    )
    return version_services.policy_version_promote(
        version=candidate, actor=None, actor_label="test"
    )


def _serve_once(monkeypatch, project, *args: str) -> tuple[str, dict, dict]:
    """Run ``serve_adapter`` until one request for /v1/models and one completion answered."""
    seen: dict = {}
    real_make_server = serving.make_server

    def make_server(*a, **k):
        server = real_make_server(*a, **k)
        seen["server"] = server
        threading.Thread(target=client, args=(server,), daemon=True).start()
        return server

    def client(server) -> None:
        try:
            with urllib.request.urlopen(f"{server.url}/models", timeout=30) as response:
                seen["models"] = json.load(response)
            body = json.dumps(
                {
                    "model": "anything",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                }
            )
            request = urllib.request.Request(
                f"{server.url}/chat/completions",
                data=body.encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                seen["completion"] = json.load(response)
        finally:
            server.shutdown()

    monkeypatch.setattr(serving, "make_server", make_server)
    out = StringIO()
    call_command("serve_adapter", project.slug, "--port", "0", *args, stdout=out)
    return out.getvalue(), seen["models"], seen["completion"]


@pytest.mark.django_db
def test_a_version_without_an_adapter_serves_the_base_model_and_says_so(project, monkeypatch):
    pytest.importorskip("torch")
    policy_services.idle_policy_update(project=project, base_model=TINY)

    output, models, completion = _serve_once(monkeypatch, project)

    assert "Serving the base model tiny-random-smollm2: v1 has no LoRA adapter" in output
    assert "Serving the base model of v1 at http://127.0.0.1:" in output
    assert models["data"][0]["id"] == TINY == completion["model"]
    assert completion["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.django_db
def test_base_serves_a_versions_base_model_without_its_adapter(project, tiny_adapter, monkeypatch):
    _adapter_version(project, str(tiny_adapter))

    output, models, _ = _serve_once(monkeypatch, project, "--base")

    assert "without its adapter, as asked" in output
    assert models["data"][0]["id"] == TINY


@pytest.mark.django_db
def test_base_with_set_upstream_on_a_version_with_an_adapter_is_refused(project, tiny_adapter):
    _adapter_version(project, str(tiny_adapter))

    with pytest.raises(CommandError, match="record the base model's answers as v2's"):
        call_command("serve_adapter", project.slug, "--base", "--set-upstream")

    assert project.__class__.objects.get(pk=project.pk).upstream_base_url == ""


@pytest.mark.django_db
def test_a_tinker_adapter_is_still_refused_unless_the_base_is_asked_for(project):
    _adapter_version(project, "tinker://run-1/sampler_weights/final")

    with pytest.raises(CommandError, match="--base serves its base model"):
        call_command("serve_adapter", project.slug)
    plan = selectors.version_to_serve(project, base_only=True)
    assert (plan.adapter_dir, plan.model_id, plan.base_model) == (None, TINY, TINY)


# --- Through the proxy ----------------------------------------------------------------------


@pytest.fixture
def proxy_url():
    """The production ASGI application (``metaclaw_site.asgi``) under uvicorn."""
    with asgi_server() as url:
        yield url


@pytest.fixture
def fresh_caches():
    runtime_policy.policy_cache_clear()
    admission.runtime_key_cache_clear()
    yield
    recording.recordings_wait(5)
    runtime_policy.policy_cache_clear()
    admission.runtime_key_cache_clear()


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_the_proxy_sends_the_name_the_adapters_server_answers_as(
    tiny_adapter, proxy_url, fresh_caches
):
    project = factories.make_project()
    key = factories.make_key(project, scopes=["runtime"])
    _adapter_version(project, str(tiny_adapter))
    plan = selectors.version_to_serve(project)
    server = serving.make_server(
        plan.base_model, plan.adapter_dir, "127.0.0.1", 0, model_id=plan.model_id
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        project.upstream_base_url = server.url
        project.save(update_fields=["upstream_base_url"])
        agent = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=key, max_retries=0)

        completion = agent.chat.completions.create(
            model="gpt-whatever",
            messages=[{"role": "user", "content": "Is the database up?"}],
            max_tokens=4,
        )
        recording.recordings_wait(5)
    finally:
        server.shutdown()
        server.server_close()

    sent = Trajectory.objects.get(project=project).model
    assert plan.model_id == "7"
    assert sent == completion.model == server.model_id == "7"
