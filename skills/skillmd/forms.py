"""The dashboard's SKILL.md import form: what a person uploads; the rules live in
``skills.skillmd.services``, whose refusals come back onto the form."""

from __future__ import annotations

import uuid

from django import forms
from django.conf import settings
from django.core.validators import RegexValidator

IMPORT_ID = RegexValidator(r"^[0-9a-f]{32}$", "Reload the page and upload again.")


def new_import_id() -> str:
    return uuid.uuid4().hex


class SkillImportForm(forms.Form):
    file = forms.FileField(
        label="Zip archive",
        help_text="A zip of SKILL.md folders (a public skill library, or an export).",
        widget=forms.ClearableFileInput(attrs={"accept": ".zip,application/zip"}),
    )
    all_or_nothing = forms.BooleanField(
        label="All or nothing",
        required=False,
        help_text="Refuse the whole import when any file is refused.",
    )
    # Generated with the page, so that its poll reads this upload's progress while it runs.
    import_id = forms.CharField(widget=forms.HiddenInput, validators=[IMPORT_ID])

    def clean_file(self):
        upload = self.cleaned_data["file"]
        limit = int(settings.METACLAW["SKILL_IMPORT_MAX_BYTES"])
        if upload.size > limit:
            raise forms.ValidationError(f"The upload is larger than {limit:,} bytes.")
        return upload
