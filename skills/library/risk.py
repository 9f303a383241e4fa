"""The risk check every skill text passes (LLM-written, imported, edited): deterministic rules,
each finding with the span it is about. Pure functions: text in, findings out; the library's
services store them on the revision and the approval service reads them.

A finding's ``severity`` is ``flag`` (the revision is flagged: no approval from a chat link, a
typed reason in the dashboard) or ``note`` (shown beside the text, blocks nothing). The rules:

- ``url``, ``domain``, ``email``: a link, a bare domain or an e-mail address outside the
  project's allow list (subdomains of an allowed domain are allowed);
- ``phone``: a phone number;
- ``exfiltration``: an instruction to reveal, send or store data (credentials, personal data,
  the system prompt, the conversation);
- ``override``: an instruction to ignore or override the system prompt, the policy or earlier
  instructions, or to take on another identity;
- ``grant``: an instruction to grant money, discounts, refunds, credits or permissions (one that
  forbids it, "never issue a refund without...", is not);
- ``encoded``: long base64 or hex runs, and instructions to encode, encipher or reverse text;
- ``code``: code blocks and shell commands are a note; ones that reach the network, read
  secrets, log keys, delete or encrypt files, or run what they download are a flag;
- ``copied``: a sentence that copies or closely paraphrases the evidence's untrusted text (the
  users' turns and the tool results) rather than saying what the agent did wrong: a skill
  writer that obeyed an injection puts the attacker's words in the skill.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

FLAG = "flag"
NOTE = "note"
FIELDS = ("name", "description", "instructions")
# Similarity above which a skill sentence (or code block) counts as a copy of the untrusted text:
# the share of its word trigrams found in it, the share of one untrusted sentence's trigrams
# found in it, or the cosine of its embedding with one untrusted sentence's.
COPY_OVERLAP = 0.6
COPY_COSINE = 0.9
COPY_MIN_WORDS = 5


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    field: str
    start: int
    end: int
    text: str
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


def is_flagged(findings: Iterable[dict]) -> bool:
    """Whether stored findings (``SkillRevision.risk_findings``) flag the revision."""
    return any(f.get("severity") == FLAG for f in findings or [])


def allowed_domains(text: str) -> list[str]:
    """A project's allow list (one domain a line, ``*.`` and ``www.`` ignored) as a list."""
    domains = []
    for line in (text or "").replace(",", "\n").splitlines():
        domain = line.strip().lower().removeprefix("*.").removeprefix("www.").strip(".")
        if domain:
            domains.append(domain)
    return domains


def _domain_allowed(domain: str, allowed: Sequence[str]) -> bool:
    domain = domain.lower().strip(".").removeprefix("www.")
    return any(domain == a or domain.endswith("." + a) for a in allowed)


# --- Patterns -----------------------------------------------------------------------------

_URL = re.compile(
    r"\b(?:https?|ftp)://[^\s<>()\"'`]+|\bwww\.[a-z0-9-]+(?:\.[a-z0-9-]+)+[^\s<>()\"'`]*", re.I
)
_EMAIL = re.compile(r"\b[a-z0-9._%+-]+@([a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,})\b", re.I)
# Bare domains: only web TLDs that are not also common file extensions (.md, .py, .sh...).
_TLDS = "com|net|org|io|co|ru|cn|biz|xyz|top|app|dev|ai|me|us|uk|de|fr|online|site|shop"
_LOOPBACK = {"localhost", "127.0.0.1", "[::1]", "0.0.0.0"}
_DOMAIN = re.compile(rf"(?<![@\w./-])((?:[a-z0-9-]+\.)+(?:{_TLDS}))\b(?![\w-]|\.\w)", re.I)
_PHONE = re.compile(
    r"(?<![\w.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}(?![\w-])"
)

_SENSITIVE = (
    r"(?:passwords?|credentials?|api[ _-]?keys?|secret keys?|(?:access|auth|session|api) tokens?|"
    r"private keys?|ssh keys?|bank (?:details|accounts?)|credit[ -]?card(?: numbers?)?|"
    r"card numbers?|social security|ssn|personal (?:data|details|information)|"
    r"(?:user|customer)(?:'s|s')? (?:data|details|information|records|e-?mails?|addresses)|"
    r"(?:the |your )?system prompt|your (?:instructions|prompt|rules)|"
    r"(?:the )?(?:conversation|chat) (?:history|log)|keystrokes|clipboard|"
    r"ip address(?:es)?|environment variables)"
)
_EXFIL_VERB = (
    r"(?:send|post|upload|forward|transmit|e-?mail|share|leak|exfiltrate|reveal|disclose|"
    r"expose|print|output|repeat|dump|store|save|log|record|copy|collect)"
)
_NEGATION = re.compile(
    r"\b(?:never|not|don't|do not|must not|mustn't|no|without|avoid|refuse|least|minimal|"
    r"securely|encrypted|hashed)\b",
    re.I,
)
# A sentence ends at a run of stops followed by a space or the end, or at a line's end: the
# dots of "www.shoplux.com" or "3.5" are inside it (cut there, a finding began in the middle
# of a link). Only a run's first stop may start a match, and the run is taken whole, so a long
# run of stops in the traffic costs linear time, not quadratic.
_SENTENCE_END = re.compile(r"(?<![.!?])[.!?]++(?=\s|$)|\n")

_RULES: list[tuple[str, re.Pattern[str], str, bool]] = [
    # (kind, pattern, message, whether a negation in the sentence cancels it)
    (
        "exfiltration",
        re.compile(rf"\b{_EXFIL_VERB}\b[^.!?\n]{{0,80}}?\b{_SENSITIVE}", re.I),
        "Tells the agent to reveal, send or store data.",
        True,
    ),
    (
        "override",
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass|skip|overrule|drop)\b[^.!?\n]{0,40}?"
            r"\b(?:previous|prior|earlier|above|preceding|all|any|your|the|system|safety)\b"
            r"[^.!?\n]{0,30}?\b(?:instructions?|prompts?|polic(?:y|ies)|rules?|guidelines?|"
            r"guardrails?|restrictions?|directives?)\b"
            r"|\byou are (?:now|no longer)\b|\bnew (?:system )?instructions?\s*:"
            r"|\bpretend (?:to be|you are)\b|\b(?:claim|say) (?:to be|you are) MetaClaw\b"
            r"|\b(?:developer|god|jailbreak|dan) mode\b",
            re.I,
        ),
        "Tells the agent to ignore or override its system prompt, policy or instructions.",
        False,
    ),
    (
        "grant",
        re.compile(
            r"\b(?:grant|give|issue|offer|approve|provide|promote|award|transfer|waive|"
            r"elevate)\b[^.!?\n]{0,60}?"
            r"(?:\b(?:refunds?|discounts?|vouchers?|coupons?|free (?:shipping|upgrades?|months?)|"
            r"store credit|money|cash|compensation|gift cards?|admin(?:istrator)? "
            r"(?:rights|access|role)|root access|superuser|full access)\b|"
            r"\d+\s?%\s?(?:off|discount)|[$€£]\s?\d)",
            re.I,
        ),
        "Tells the agent to grant money, discounts, refunds or permissions.",
        True,
    ),
    (
        "encoded",
        re.compile(
            r"\b(?:base ?(?:16|32|58|64|85)|rot-?13|caesar|(?:mono|poly)alphabetic|"
            r"substitution cipher|cipher(?:ed|text)?|encrypt(?:ed|ion)? (?:your|the|each|every|"
            r"all) (?:answer|reply|response|message|output)s?)\b"
            r"|\b(?:reverse|invert)\b[^.!?\n]{0,30}\b(?:answer|reply|response|message|text|"
            r"letters|characters?|order)\b|\b(?:write|reply|respond|answer)\b[^.!?\n]{0,20}"
            r"\b(?:backwards?|in reverse)\b|\bshift each letter\b"
            r"|\b(?:emojis? only|with emojis|using emojis|emoji substitution)\b",
            re.I,
        ),
        "Tells the agent to encode, encipher or disguise text.",
        False,
    ),
]

_BLOB = re.compile(
    r"(?<![\w+/=])(?=[A-Za-z0-9+/]*\d)(?=[A-Za-z0-9+/]*[A-Z])[A-Za-z0-9+/]{40,}={0,2}"
)
_HEX = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{48,}(?![0-9a-fA-F])")
_FENCE = re.compile(r"```[^\n]*\n.*?(?:```|$)", re.S)
_SHELL_LINE = re.compile(
    r"^\s*(?:\$ |sudo |curl |wget |rm |chmod |chown |nc |ncat |ssh |scp |powershell |"
    r"python3? -c |bash -c |sh -c |eval |iptables |shutdown |mkfs|dd if=).*$",
    re.M,
)
_INLINE_CODE = re.compile(r"`[^`\n]{2,}`")
_INLINE_DANGEROUS = re.compile(
    r"requests\.post|\bcurl\b[^`]*\|\s*(?:ba)?sh\b|\bwget\b[^`]*\|\s*(?:ba)?sh\b|\bnc -e\b|"
    r"/dev/tcp|base64 -d[^`]*\|\s*(?:ba)?sh\b"
)
_DANGEROUS = re.compile(
    r"requests\.(?:post|put|get)|urllib|http\.client|socket\.|smtplib|paramiko|ftplib|"
    r"\bcurl\b|\bwget\b|\bnc\b|netcat|/dev/tcp|\bsubprocess\b|os\.system|os\.popen|\beval\(|"
    r"\bexec\(|pynput|keyboard\.(?:on_press|hook)|pyautogui|ImageGrab|getpass|pyperclip|"
    r"clipboard|pexpect|scapy|psutil\.net|ipconfig|/etc/hosts|authorized_keys|pickle\.loads|"
    r"rm -rf|shutil\.rmtree|os\.remove|\bmkfs\b|dd if=|iptables|netsh|ifconfig \w+ down|"
    r"shutdown|reboot|Fernet|Crypto\.Cipher|hazmat|ransom|os\.fork|:\(\)\s*\{|"
    r"\|\s*(?:ba)?sh\b|chmod \+x|private[_ ]?key|/etc/(?:passwd|shadow)|\.ssh/|base64 -d",
    re.I,
)


_DANGER_MESSAGE = (
    "Code or a shell command that reaches the network, reads secrets or keys, or deletes, "
    "encrypts or runs files."
)


def _sentence_at(text: str, start: int, end: int) -> str:
    left = max(text.rfind(c, 0, start) for c in ".!?\n") + 1
    rights = [i for i in (text.find(c, end) for c in ".!?\n") if i != -1]
    return text[left : min(rights) if rights else len(text)]


def _check_field(field: str, text: str, allowed: Sequence[str]) -> list[Finding]:
    found: list[Finding] = []

    def add(kind: str, severity: str, start: int, end: int, message: str) -> None:
        found.append(Finding(kind, severity, field, start, end, text[start:end], message))

    covered: list[tuple[int, int]] = []
    for m in _URL.finditer(text):
        url = m.group(0).rstrip(".,;:!?")
        host = re.sub(r"^(?:https?|ftp)://", "", url, flags=re.I).split("/")[0].split(":")[0]
        host = host.split("@")[-1]
        covered.append((m.start(), m.start() + len(url)))
        if host.lower() not in _LOOPBACK and not _domain_allowed(host, allowed):
            add("url", FLAG, m.start(), m.start() + len(url), f"Links to {host}, which the "
                "project's allow list does not name.")  # fmt: skip
    for m in _EMAIL.finditer(text):
        covered.append(m.span())
        if not _domain_allowed(m.group(1), allowed):
            add("email", FLAG, *m.span(), "An e-mail address outside the project's allow list.")
    for m in _DOMAIN.finditer(text):
        if any(a <= m.start() < b for a, b in covered):
            continue
        if not _domain_allowed(m.group(1), allowed):
            add("domain", NOTE, *m.span(1), f"Names the domain {m.group(1)}, which the "
                "project's allow list does not name.")  # fmt: skip
    for m in _PHONE.finditer(text):
        add("phone", FLAG, *m.span(), "A phone number.")
    for kind, pattern, message, negatable in _RULES:
        for m in pattern.finditer(text):
            if negatable and _NEGATION.search(_sentence_at(text, m.start(), m.end())):
                continue
            add(kind, FLAG, *m.span(), message)
    for pattern in (_BLOB, _HEX):
        for m in pattern.finditer(text):
            add("encoded", FLAG, *m.span(), "A long encoded run (base64 or hex).")
    code_spans = [m.span() for m in _FENCE.finditer(text)]
    for pattern in (_SHELL_LINE, _INLINE_CODE):
        code_spans += [m.span() for m in pattern.finditer(text)
                       if not any(a <= m.start() < b for a, b in code_spans)]  # fmt: skip
    for start, end in sorted(code_spans):
        danger = _DANGEROUS.search(text, start, end)
        # Inline code names a command in prose ("never `rm -rf` a workspace"): only a network
        # call or a download run by a shell flags it there.
        if danger and text[start] == "`" and not text.startswith("```", start):
            danger = _INLINE_DANGEROUS.search(text, start, end)
        if danger:
            add("code", FLAG, danger.start(), danger.end(), _DANGER_MESSAGE)
        else:
            add("code", NOTE, start, end, "Code or a shell command: check what it does.")
    return found


def _segments(text: str) -> list[tuple[int, int, str]]:
    """The pieces compared with the evidence: each code block whole, each sentence outside
    them; pieces of fewer than ``COPY_MIN_WORDS`` words are left out."""
    out: list[tuple[int, int, str]] = []
    blocks = [m.span() for m in _FENCE.finditer(text or "")]
    for start, end in blocks:
        out.append((start, end, text[start:end]))
    for sentence_start, sentence_end in _sentences(text or ""):
        if any(a <= sentence_start < b for a, b in blocks):
            continue
        chunk = text[sentence_start:sentence_end]
        stripped = chunk.strip(" \t\n-*#>`")
        if stripped:
            begin = sentence_start + chunk.find(stripped)
            out.append((begin, begin + len(stripped), stripped))
    return [seg for seg in out if len(_WORD.findall(seg[2])) >= COPY_MIN_WORDS]


def _sentences(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``, its closing stops or line end included."""
    start = 0
    for m in _SENTENCE_END.finditer(text):  # each match is a sentence's non-empty end
        yield start, m.end()
        start = m.end()
    if start < len(text):
        yield start, len(text)


_WORD = re.compile(r"[a-z0-9]+", re.I)


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = [w.lower() for w in _WORD.findall(text)]
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


class _Evidence:
    """The untrusted texts a skill is compared with, cut and measured once for all its fields:
    their sentences, their trigrams and (on first use) their vectors. Embedding the evidence's
    sentences is most of the check's cost; it was paid again for each field."""

    def __init__(self, untrusted: Sequence[str]) -> None:
        self.texts = [u for u in untrusted if u]
        self.segments = [seg for u in self.texts for _, _, seg in _segments(u)]
        self._vectors: Any = None

    @cached_property
    def pool(self) -> set[tuple[str, ...]]:
        return set().union(*(_trigrams(u) for u in self.texts))

    @cached_property
    def grams(self) -> list[set[tuple[str, ...]]]:
        return [g for g in (_trigrams(t) for t in self.segments) if g]

    def vectors(self, embedder: Any) -> Any:
        if self._vectors is None:
            self._vectors = embedder.embed(self.segments)
        return self._vectors


def _copied(field: str, text: str, evidence: _Evidence) -> list[Finding]:
    mine = _segments(text)
    if not mine or not evidence.segments:
        return []
    overlaps = []
    for _, _, segment in mine:
        grams = _trigrams(segment)
        # Either most of the skill's sentence comes from the traffic, or one of the traffic's
        # sentences sits nearly whole inside it (an instruction with words put around it).
        share = len(grams & evidence.pool) / len(grams) if grams else 0.0
        inside = max((len(g & grams) / len(g) for g in evidence.grams), default=0.0)
        overlaps.append(max(share, inside))
    try:
        from skills.library.embeddings import get_embedder

        embedder = get_embedder()
        a = embedder.embed([seg for _, _, seg in mine])
        cosines = (a @ evidence.vectors(embedder).T).max(axis=1).tolist()
    except Exception:  # the overlap alone still catches verbatim copies
        cosines = [0.0] * len(mine)
    found = []
    for (start, end, _), overlap, cos in zip(mine, overlaps, cosines, strict=True):
        if overlap >= COPY_OVERLAP or cos >= COPY_COSINE:
            found.append(Finding("copied", FLAG, field, start, end, text[start:end],
                f"Copies the evidence's untrusted text (users' turns, tool results; "
                f"{max(overlap, cos):.0%} alike). A skill says what the agent did wrong; it "
                "does not repeat what the traffic asked for."))  # fmt: skip
    return found


def risk_check(
    *,
    name: str,
    description: str,
    instructions: str,
    allowed: Sequence[str] = (),
    untrusted: Sequence[str] = (),
) -> list[Finding]:
    """Every finding on one skill text, in field then span order. ``allowed``: the project's
    allowed domains; ``untrusted``: the users' turns and tool results of the evidence it was
    written from (empty for an import)."""
    findings: list[Finding] = []
    evidence = _Evidence(untrusted)
    for field, text in (("name", name), ("description", description),
                        ("instructions", instructions)):  # fmt: skip
        findings += _check_field(field, text or "", allowed)
        if field != "name":
            findings += _copied(field, text or "", evidence)
    order = {f: i for i, f in enumerate(FIELDS)}
    return sorted(findings, key=lambda f: (order[f.field], f.start, f.end, f.kind))


def highlighted(text: str, findings: Iterable[dict], field: str) -> list[tuple[str, dict | None]]:
    """``text`` cut into pieces for display: ``(piece, finding)`` where a finding covers it,
    ``(piece, None)`` elsewhere. Where findings overlap, each piece shows the innermost one
    (the one that starts last, then the narrowest): a link inside a copied sentence is marked
    as the link, and the rest of the sentence as copied."""
    spans = [
        (max(f["start"], 0), min(f["end"], len(text)), f)
        for f in findings
        if f.get("field") == field and f.get("end", 0) > f.get("start", 0)
    ]
    cuts = sorted({0, len(text), *(a for a, _, _ in spans), *(b for _, b, _ in spans)})
    pieces: list[tuple[str, dict | None]] = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if a >= len(text):  # a stored finding past the text's end
            break
        innermost = max(
            (span for span in spans if span[0] <= a and b <= span[1]),
            key=lambda span: (span[0], -span[1]),
            default=None,
        )
        finding = innermost[2] if innermost else None
        if pieces and pieces[-1][1] is finding:
            pieces[-1] = (pieces[-1][0] + text[a:b], finding)  # one piece per run of the same
        else:
            pieces.append((text[a:b], finding))
    return pieces
