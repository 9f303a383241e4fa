"""The idle-window settings form. Validation of the windows and calendar lives in the service;
this form only converts strings to types."""

from __future__ import annotations

import json

from django import forms

from training.policy import windows
from training.policy.models import Backend, IdleMode, IdleWindowPolicy, Objective


class IdlePolicyForm(forms.Form):
    auto_train = forms.BooleanField(required=False, label="Train on its own when idle and ready")
    mode = forms.ChoiceField(choices=IdleMode.choices, label="Idle when")
    timezone = forms.CharField(max_length=64)
    weekly_windows = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="One window a line, e.g. “mon-fri 01:00-05:00” or “sat,sun 00:00-08:00”.",
    )
    ical_url = forms.URLField(required=False, label="iCalendar feed URL", assume_scheme="https")
    ical_text = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        label="iCalendar content",
        help_text="Paste an .ics file; events mark quiet windows.",
    )
    traffic_threshold_rpm = forms.IntegerField(min_value=0, label="Quiet below (requests/min)")
    traffic_idle_minutes = forms.IntegerField(min_value=1, max_value=120, label="For (minutes)")
    min_new_samples = forms.IntegerField(min_value=1, label="New usable samples needed")
    max_runs_per_day = forms.IntegerField(min_value=0, label="Runs per day at most")
    max_tokens_per_run = forms.IntegerField(min_value=1, label="Tokens per run at most")
    max_sample_tokens = forms.IntegerField(min_value=16, label="Tokens per sample at most")
    eval_fraction = forms.FloatField(min_value=0.01, max_value=0.89, label="Held-out fraction")
    stale_after_minutes = forms.IntegerField(min_value=1, label="Stale after (minutes)")
    backend = forms.ChoiceField(choices=Backend.choices)
    base_model = forms.CharField(max_length=300)
    objective = forms.ChoiceField(choices=Objective.choices)
    lora_rank = forms.IntegerField(min_value=1, max_value=256)
    learning_rate = forms.FloatField(min_value=1e-9, max_value=1.0)
    batch_size = forms.IntegerField(min_value=1, max_value=512)
    total_steps = forms.IntegerField(min_value=1, max_value=100_000)
    backend_options = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text='JSON, e.g. {"num_threads": 2} or {"timeout": 600}. Secrets belong in the '
        "environment (TINKER_API_KEY).",
    )

    @classmethod
    def for_policy(cls, policy: IdleWindowPolicy) -> IdlePolicyForm:
        initial = {name: getattr(policy, name) for name in cls.base_fields}
        initial["weekly_windows"] = windows.format_weekly_windows(policy.weekly_windows or [])
        initial["backend_options"] = json.dumps(policy.backend_options or {})
        return cls(initial=initial)

    def clean_backend_options(self) -> dict:
        raw = (self.cleaned_data.get("backend_options") or "").strip()
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise forms.ValidationError(f"Not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise forms.ValidationError("Write a JSON object.")
        return value
