"""The retrieval threshold holds on the labelled set it was set from
(``benchmarks/data/retrieval_set.json``, ``benchmarks/retrieval.py``): at the site's default,
each skill reaches most of its request family, and requests no skill applies to are not all
handed skills. No database: retrieval runs over an in-memory policy snapshot."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from django.conf import settings

from skills.library.embeddings import get_embedder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "retrieval_bench", ROOT / "benchmarks" / "retrieval.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_default_threshold_reaches_most_of_each_skills_family(bench):
    if not get_embedder().name.startswith("wordllama"):
        pytest.skip("the default threshold was set for the default embedder (wordllama)")
    default = settings.METACLAW["RETRIEVAL_MIN_SCORE"]
    margin = settings.METACLAW["RETRIEVAL_MARGIN"]

    (pull,) = bench.evaluate(bench.load_set(), [default])
    (proxy,) = bench.evaluate(bench.load_set(), [default], margin)

    for figures in (pull, proxy):
        assert figures.recall >= bench.RECALL_TARGET
        slug, family_recall = figures.worst_family
        assert family_recall >= bench.RECALL_TARGET, f"{slug}: {family_recall:.0%} of its family"
        assert figures.top1 >= 0.75
        assert figures.unrelated_hit < 0.75
    # The proxy's margin keeps most of the skills that only pass the threshold out.
    assert proxy.precision >= 0.35 > pull.precision


def test_the_labelled_set_has_ten_families_and_unrelated_requests(bench):
    data = bench.load_set()

    assert len(data["skills"]) == 10
    assert all(len(skill["requests"]) >= 10 for skill in data["skills"])
    assert len(data["unrelated"]) >= 40
    assert len({skill["slug"] for skill in data["skills"]}) == 10
