"""Forms of the project administration pages. They parse what a person typed; the rules live in
``base.services``, whose refusals come back onto the field they name. ``json_object`` parses a
typed JSON object for any app's form."""

from __future__ import annotations

import json
from typing import Any

from django import forms

from base import selectors
from base.errors import DomainError
from base.models import Project


def _plain_text_area(*, label: str, help_text: str) -> forms.CharField:
    """An optional field of a few lines of names or JSON, which spell checking only marks up."""
    return forms.CharField(
        label=label,
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
        help_text=help_text,
    )


def json_object(text: str, *, not_json: str, not_object: str) -> dict:
    """What a person typed as a JSON object ({} when blank). A refusal says ``not_json`` (its
    ``{}`` filled with the parser's complaint) or ``not_object``."""
    text = text.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise forms.ValidationError(not_json.format(exc)) from exc
    if not isinstance(value, dict):
        raise forms.ValidationError(not_object)
    return value


class ProjectSettingsForm(forms.Form):
    name = forms.CharField(max_length=200)
    upstream_base_url = forms.CharField(
        label="Upstream base URL",
        required=False,
        max_length=200,
        widget=forms.URLInput(attrs={"placeholder": "https://api.openai.com/v1"}),
        help_text="The OpenAI-compatible endpoint the proxy forwards to, ending where the API "
        "starts (usually /v1). Empty: the site's UPSTREAM_BASE_URL.",
    )
    upstream_api_key = forms.CharField(
        label="Upstream API key",
        required=False,
        max_length=500,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only and stored encrypted. Leave empty to keep the stored key.",
    )
    upstream_api_key_clear = forms.BooleanField(label="Clear the stored key", required=False)
    upstream_model_map = _plain_text_area(
        label="Upstream model map",
        help_text='JSON: the model an agent asks for → the upstream\'s name for it; "*" '
        'matches any, e.g. {"gpt-4o-mini": "my-deployment", "*": "fallback-model"}.',
    )
    group_merge_threshold = forms.FloatField(
        label="Group merge threshold",
        min_value=0.0,
        max_value=1.0,
        widget=forms.NumberInput(attrs={"step": "0.01"}),
        help_text="Cosine similarity (0–1) at which a new group joins an open group of the "
        "same failure mode; 0 = the site default.",
    )
    incidental_tools = _plain_text_area(
        label="Incidental tools",
        help_text="One tool name a line (* as a wildcard) that never decides a failure's "
        "group, beside the built-in ones.",
    )
    risk_allowed_domains = _plain_text_area(
        label="Domains skills may name",
        help_text="One domain a line (subdomains included). A skill text that links to or "
        "names an e-mail address of any other domain is flagged by the risk check.",
    )
    require_second_approver = forms.BooleanField(
        label="Require a second approver",
        required=False,
        help_text="A skill revision goes live only after two different reviewers approve it.",
    )
    approval_link_ttl_hours = forms.IntegerField(
        label="Approval links expire after (hours)", min_value=1, max_value=720
    )
    approval_links_require_login = forms.BooleanField(
        label="Approval links require the addressee to be logged in", required=False
    )
    llm_daily_token_budget = forms.IntegerField(
        label="Daily LLM token budget",
        min_value=0,
        help_text="Tokens in + out per day for skill synthesis and the LLM judge; 0 = unlimited.",
    )
    min_sources_for_synthesis = forms.IntegerField(
        label="Distinct sources before a skill is proposed",
        min_value=1,
        max_value=1000,
        required=False,
        help_text="End users, else sessions, else API keys a failure group's incidents must "
        "come from before the fast loop proposes a skill; 1 = any single incident.",
    )
    rate_limit_per_minute = forms.IntegerField(
        label="Rate limit per minute",
        min_value=1,
        required=False,
        help_text="Requests per minute per API key; empty = the site default.",
    )

    replay_gate_mode = forms.ChoiceField(
        label="Replay gate",
        choices=[("off", "Off"), ("advisory", "Advisory"), ("required", "Required")],
        required=False,
        help_text="Before a candidate is promoted, replay recorded failing conversations with its "
        "system prompt and the active one, and judge each pair. Required: promotion waits for "
        "a passed gate.",
    )
    replay_gate_max_calls = forms.IntegerField(
        label="Replay gate: model calls per gate",
        min_value=2,
        max_value=10_000,
        required=False,
        help_text="Replays and judgements together; the gate stops at this cap.",
    )
    replay_gate_max_tokens = forms.IntegerField(
        label="Replay gate: tokens per gate",
        min_value=1_000,
        required=False,
        help_text="Tokens in + out of the replays and judgements together.",
    )

    SECTIONS = (
        ("Project", ("name",)),
        (
            "Upstream model",
            (
                "upstream_base_url",
                "upstream_api_key",
                "upstream_api_key_clear",
                "upstream_model_map",
            ),
        ),
        ("Grouping", ("group_merge_threshold", "incidental_tools")),
        (
            "Review and approval",
            ("require_second_approver", "approval_link_ttl_hours", "approval_links_require_login"),
        ),
        ("Limits", ("llm_daily_token_budget", "rate_limit_per_minute")),
        ("Untrusted traffic", ("min_sources_for_synthesis", "risk_allowed_domains")),
        ("Replay gate", ("replay_gate_mode", "replay_gate_max_calls", "replay_gate_max_tokens")),
    )

    @classmethod
    def initial_for(cls, project: Project) -> dict[str, Any]:
        model_map = (
            project.upstream_model_map if isinstance(project.upstream_model_map, dict) else {}
        )
        # Every field shows the project's value; the key is write-only, the map is JSON.
        return {
            **{
                name: getattr(project, name)
                for name in cls.base_fields
                if name not in ("upstream_api_key", "upstream_api_key_clear")
            },
            "upstream_model_map": json.dumps(model_map, indent=1) if model_map else "",
        }

    def __init__(self, *args: Any, project: Project, **kwargs: Any) -> None:
        kwargs.setdefault("initial", self.initial_for(project))
        super().__init__(*args, **kwargs)
        self.project = project
        self.key_state = selectors.project_upstream_api_key_state(project)

    def clean_upstream_model_map(self) -> dict:
        return json_object(
            self.cleaned_data["upstream_model_map"],
            not_json="Not valid JSON: {}.",
            not_object='The model map is a JSON object, e.g. {"gpt-4o-mini": "my-deployment"}.',
        )

    def clean_min_sources_for_synthesis(self) -> int:
        # Left empty (or a form that predates the field): the setting stays as it is.
        value = self.cleaned_data.get("min_sources_for_synthesis")
        return self.project.min_sources_for_synthesis if value is None else value

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("upstream_api_key") and cleaned.get("upstream_api_key_clear"):
            self.add_error("upstream_api_key", "Type a new key or clear the stored one, not both.")
        return cleaned

    def key_given(self) -> str | None:
        """The key as the service takes it: the typed one, "" to clear, None to keep."""
        if self.cleaned_data.get("upstream_api_key_clear"):
            return ""
        return self.cleaned_data.get("upstream_api_key") or None

    def changes(self) -> dict[str, Any]:
        """Every setting on the form, for ``project_settings_update``; the key only when
        typed or cleared (an empty field keeps it)."""
        changes = {
            name: self.cleaned_data[name]
            for name in self.fields
            if name not in ("upstream_api_key", "upstream_api_key_clear")
            # The replay gate's settings, left out of a post (an older form), stay as they are.
            and not (name.startswith("replay_gate_") and self.cleaned_data[name] in (None, ""))
        }
        key = self.key_given()
        if key is not None:
            changes["upstream_api_key"] = key
        return changes

    def add_domain_error(self, exc: DomainError) -> None:
        """A service's refusal, on the field it names (or on the whole form)."""
        field = exc.field if exc.field in self.fields else None
        self.add_error(field, str(exc))
