"""The training settings form. Validation lives in the service that the form and the API both
call (``idle_policy_update``); this form converts strings to types, within the service's
limits."""

from __future__ import annotations

import json

from django import forms

from base.forms import json_object
from training.policy import windows
from training.policy.models import Backend, IdleMode, IdleWindowPolicy, Objective
from training.policy.selectors import auto_training_on
from training.policy.services import NUMBER_BOUNDS


def _number(name: str, **options: object) -> forms.Field:
    """A number field with the limits the service enforces (the browser shows them too)."""
    bounds = NUMBER_BOUNDS[name]
    field = forms.IntegerField if bounds.kind is int else forms.FloatField
    low = None if bounds.open_low else bounds.low  # an open end is the service's to refuse
    return field(min_value=low, max_value=bounds.high, **options)


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
    traffic_threshold_rpm = _number("traffic_threshold_rpm", label="Quiet below (requests/min)")
    traffic_idle_minutes = _number("traffic_idle_minutes", label="For (minutes)")
    min_new_samples = _number("min_new_samples", label="New usable samples needed")
    max_runs_per_day = _number("max_runs_per_day", label="Runs per day at most")
    max_tokens_per_run = _number("max_tokens_per_run", label="Tokens per run at most")
    max_sample_tokens = _number("max_sample_tokens", label="Tokens per sample at most")
    eval_fraction = _number("eval_fraction", label="Held-out fraction")
    stale_after_minutes = _number("stale_after_minutes", label="Stale after (minutes)")
    backend = forms.ChoiceField(choices=Backend.choices)
    base_model = forms.CharField(max_length=300)
    objective = forms.ChoiceField(choices=Objective.choices)
    lora_rank = _number("lora_rank")
    learning_rate = _number("learning_rate")
    batch_size = _number("batch_size")
    total_steps = _number("total_steps")
    backend_options = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text='JSON, e.g. {"num_threads": 2} or {"timeout": 600}. Secrets belong in the '
        "environment (TINKER_API_KEY).",
    )

    @classmethod
    def for_policy(cls, policy: IdleWindowPolicy) -> IdlePolicyForm:
        initial = {name: getattr(policy, name) for name in cls.base_fields}
        initial["auto_train"] = auto_training_on(policy)  # what the beat does, not the default
        initial["weekly_windows"] = windows.format_weekly_windows(policy.weekly_windows or [])
        initial["backend_options"] = json.dumps(policy.backend_options or {})
        return cls(initial=initial)

    def clean_backend_options(self) -> dict:
        return json_object(
            self.cleaned_data.get("backend_options") or "",
            not_json="Not JSON: {}",
            not_object="Write a JSON object.",
        )
