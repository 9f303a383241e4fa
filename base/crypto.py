"""Secrets that MetaClaw must send on and so cannot hash (a project's upstream API key), kept
encrypted at rest: Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) under a key
derived from ``SECRET_KEY`` with HKDF.

A stored value is ``PREFIX`` + a Fernet token. A value without the prefix is plaintext written
before encryption existed (migration ``0003_encrypt_upstream_api_key`` encrypts those) and is
read as is. Rotating ``SECRET_KEY``: put the old one in ``SECRET_KEY_FALLBACKS`` and stored
values still decrypt (they are re-encrypted under the new key when next saved); without it they
cannot be read, and the admin types the upstream key again."""

from __future__ import annotations

import base64
import functools

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings

PREFIX = "enc:fernet:"
# Distinct from every other use of SECRET_KEY (sessions, signing), so one never helps the other.
_HKDF_INFO = b"metaclaw project secrets v1"


class SecretUnreadable(ValueError):
    """A stored secret that no current key decrypts (``SECRET_KEY`` changed without a
    fallback), or that was tampered with."""


def _derive(secret_key: str) -> Fernet:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO)
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(secret_key.encode())))


@functools.lru_cache(maxsize=8)
def _fernet_for(secret_keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([_derive(key) for key in secret_keys])


def _fernet() -> MultiFernet:
    keys = (settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ()))
    return _fernet_for(tuple(str(key) for key in keys if key))


def is_encrypted(value: str) -> bool:
    return value.startswith(PREFIX)


def encrypt(plaintext: str) -> str:
    """The stored form of ``plaintext``; ``""`` stays ``""`` (no secret is no secret)."""
    if not plaintext:
        return ""
    return PREFIX + _fernet().encrypt(plaintext.encode()).decode("ascii")


def decrypt(stored: str) -> str:
    """The plaintext of a stored value (see the module's note on values without the prefix).
    Raises ``SecretUnreadable`` when no key decrypts it."""
    if not stored or not is_encrypted(stored):
        return stored or ""
    return _decrypt_cached(stored, _fernet())


@functools.lru_cache(maxsize=256)
def _decrypt_cached(stored: str, fernet: MultiFernet) -> str:
    # The proxy reads the key on every request; a token always decrypts to the same text, and
    # the cache is keyed on the keys too, so a rotation is never served a stale answer.
    try:
        return fernet.decrypt(stored[len(PREFIX) :].encode("ascii")).decode()
    except (InvalidToken, UnicodeError) as exc:
        raise SecretUnreadable(
            "A stored secret cannot be decrypted with SECRET_KEY or SECRET_KEY_FALLBACKS."
        ) from exc
