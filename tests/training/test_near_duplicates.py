"""Near duplicates in the dataset build (MinHash + LSH, ``training.datasets.dedup``): a sample
that repeats an earlier one with a little noise is dropped, distinct samples are kept, however
alike their wording and however many there are."""

from __future__ import annotations

import pytest

from incidents.ingest import trajectories_ingest
from tests.training.test_dataset import WORDS, turn
from training.datasets import services as datasets_services

pytestmark = pytest.mark.django_db

ANSWER = (
    "Sure. 1) Open Settings > Data. 2) Click 'Request export'. 3) We email a download link "
    "when the archive is ready, usually within an hour."
)


def test_a_repeat_with_a_little_noise_is_dropped_and_the_first_is_kept(project):
    trajectories_ingest(
        project=project,
        items=[
            turn("How can I export all my data?", ANSWER),
            turn("how can I export ALL my data, please??", ANSWER),
            turn("How can I export all my data?", ANSWER.replace("an hour", "an hour!")),
            # Another question with the same answer shares too little of its wording.
            turn("Is there a way to download everything we stored?", ANSWER),
            turn("How can I export all my data?", "Settings > Data > Request export."),
        ],
    )

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.report["dropped"] == {"near_duplicate": 2}
    assert dataset.report["near_duplicate_threshold"] == 0.8
    kept = [(s["messages"][-2]["content"], s["messages"][-1]["content"]) for s in dataset.samples]
    assert kept == [
        ("How can I export all my data?", ANSWER),
        ("Is there a way to download everything we stored?", ANSWER),
        ("How can I export all my data?", "Settings > Data > Request export."),
    ]


def test_many_samples_from_one_template_are_all_kept(project):
    items = [
        turn(
            f"Where is order {n} of the {WORDS[n % len(WORDS)]} team?",
            f"Order {n} left the warehouse on day {n % 28 + 1}; "
            f"tracking code {n * 7919 % 100_000:05d}.",
        )
        for n in range(400)
    ]
    trajectories_ingest(project=project, items=items)

    dataset = datasets_services.dataset_build(project=project)

    assert "near_duplicate" not in dataset.report["dropped"]
    assert dataset.report["kept"] == 400


def test_near_duplicates_among_many_distinct_samples_are_each_found(project):
    items = []
    for n in range(300):
        question = f"Tell me about {WORDS[n % len(WORDS)]} number {n} for region {n % 7}"
        answer = f"Item {n} of {WORDS[(n * 3) % len(WORDS)]} is fine, see page {n * 13 % 1000}."
        items.append(turn(question, answer))
        if n % 30 == 0:
            items.append(turn(question.upper() + "!", answer))
    trajectories_ingest(project=project, items=items)

    dataset = datasets_services.dataset_build(project=project)

    assert dataset.report["dropped"] == {"near_duplicate": 10}
    assert dataset.report["kept"] == 300
    assert not any(s["messages"][-2]["content"].endswith("!") for s in dataset.samples)
