"""Does the slow loop fix what it is shown? A house rule the base model never follows, the
failures reported with a person's corrected answer, a run with default settings, and the
failure rate on held-out requests in other wordings, base model vs the run's adapter.

    python benchmarks/efficacy.py --quick                 # about 30 train / 30 held-out
    python benchmarks/efficacy.py --train 60 --held-out 60
    python benchmarks/efficacy.py --quick --llm-base-url http://127.0.0.1:8000/v1 --llm-model m

The task family: a support agent (SmolLM2-135M-Instruct, the model the local backend ships,
served over an OpenAI-compatible API by ``training.backends.serving``, as ``serve_adapter``
does) answers account questions. The house rule, which its system prompt does not state: every
answer ends with the ticket code of the request's order, ``[TCK-<order number>]``. The checker
is exact (a regex on the end of the answer, the order's number included).

1. The agent answers ``--train`` requests; the checker reports each through MetaClaw's public
   API (``POST /api/v1/trajectories/batch``) with its outcome, a person's corrected answer
   (the agent's gist is not needed: a short answer that follows the rule) and the check itself.
2. ``POST /api/v1/training/runs`` (Train now) with the project's default hyperparameters (no
   learning rate or steps set by hand; ``--budget-minutes`` is the run's search budget); the
   worker's task body (``training_run_execute``) runs here; the search it made is printed.
3. The base model (or ``--llm-base-url``) and the run's adapter (served like ``serve_adapter``)
   answer ``--held-out`` requests in other wordings; failure rates with Wilson 95 % intervals.
   Target: failures cut by at least half.

Part (b) of the efficacy issue (the fast loop with and without an approved skill) is not here.
Database ``metaclaw_bench_efficacy`` (dropped and migrated at the start).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import urllib.request
import uuid

from _harness import ROOT, Server, bench_env, django_setup, ensure_database, free_port

ENV = bench_env("metaclaw_bench_efficacy")

SYSTEM = "You are the support agent of Acme Cloud. Answer in one short sentence."
TOPICS = [
    ("reset my password", "Use 'Forgot password' on the login page."),
    ("download an invoice", "Open Settings > Billing > Invoices."),
    ("add a teammate", "Open Settings > Members and click Invite."),
    ("turn on two-factor login", "Open Settings > Security and enable two-factor."),
    ("cancel my plan", "Open Settings > Billing and click Cancel plan."),
    ("export my data", "Open Settings > Data and click Export."),
    ("change my email address", "Open Settings > Profile and edit the email."),
    ("see my API usage", "Open Settings > Usage."),
]
TRAIN_WORDINGS = [
    "Order {order}: how do I {task}?",
    "How can I {task}? My order is {order}.",
    "Hi, order {order} here. I want to {task}.",
]
HELD_OUT_WORDINGS = [
    "Quick question about order {order} - where do I {task}?",
    "I need to {task} (order number {order}). What do I do?",
    "Could you tell me how to {task}? Reference: order {order}.",
]


def rule(order: int) -> str:
    return rf"\[TCK-{order}\]\s*$"


def follows_rule(answer: str, order: int) -> bool:
    return re.search(rule(order), answer.strip()) is not None


def requests_for(count: int, wordings: list[str], seed: int) -> list[tuple[list[dict], int, str]]:
    rng = random.Random(seed)
    out = []
    for n in range(count):
        task, gist = TOPICS[n % len(TOPICS)]
        order = rng.randrange(1000, 10_000)
        text = wordings[(n // len(TOPICS)) % len(wordings)].format(order=order, task=task)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        out.append((messages, order, f"{gist} [TCK-{order}]"))
    return out


def chat(base_url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer bench"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"] or ""


def failure_rate(answers: list[str], items: list) -> tuple[int, int]:
    failed = sum(
        not follows_rule(a, order) for a, (_, order, _) in zip(answers, items, strict=True)
    )
    return failed, len(items)


def model_server(base_model: str, adapter: str | None) -> tuple[Server, str]:
    port = free_port()
    command = [sys.executable, "-m", "training.backends.serving", "--base-model", base_model]
    command += ["--port", str(port)] + (["--adapter", adapter] if adapter else [])
    return Server(command, ENV, port), f"http://127.0.0.1:{port}/v1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 train, 30 held-out.")
    parser.add_argument("--train", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=60)
    parser.add_argument("--budget-minutes", type=int, default=None, help="The search budget.")
    parser.add_argument("--llm-base-url", default="", help="An OpenAI-compatible agent model.")
    parser.add_argument("--llm-model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=40)
    args = parser.parse_args()
    if args.quick:
        args.train, args.held_out = 30, 30
    budget = args.budget_minutes or (6 if args.quick else 20)
    started = time.monotonic()
    timings: dict[str, float] = {}
    ensure_database(ENV, fresh=True)
    django_setup(ENV)
    from django.test import Client

    from base import services
    from metaclaw_site.projects import project_create
    from training.runs.execute import training_run_execute
    from training.runs.models import TrainingRun
    from training.runs.outcomes import wilson

    run_tag = uuid.uuid4().hex[:6]
    project = project_create(name=f"Efficacy {run_tag}", slug=f"efficacy-{run_tag}")
    key = services.api_key_create(project=project, name="bench", scopes=["ingest", "admin"]).secret
    client = Client(SERVER_NAME="localhost", HTTP_AUTHORIZATION=f"Bearer {key}")

    def api(method: str, path: str, body: dict | None = None) -> dict:
        response = getattr(client, method)(
            path, data=json.dumps(body or {}), content_type="application/json"
        )
        assert response.status_code < 300, (path, response.status_code, response.content)
        return response.json()

    train_items = requests_for(args.train, TRAIN_WORDINGS, seed=1)
    held_items = requests_for(args.held_out, HELD_OUT_WORDINGS, seed=2)

    # 1. The agent answers; the checker reports every answer, failures with a corrected one.
    t0 = time.monotonic()
    base_server, base_url = model_server("smollm2-135m", None)
    with base_server:
        agent_url = args.llm_base_url or base_url
        train_answers = [
            chat(agent_url, args.llm_model, m, args.max_tokens) for m, _, _ in train_items
        ]
        timings["agent answers (train)"] = time.monotonic() - t0
        t0 = time.monotonic()
        base_answers = [
            chat(agent_url, args.llm_model, m, args.max_tokens) for m, _, _ in held_items
        ]
        timings["base model on held-out"] = time.monotonic() - t0
    items = []
    for n, ((messages, order, corrected), answer) in enumerate(
        zip(train_items, train_answers, strict=True)
    ):
        ok = follows_rule(answer, order)
        items.append(
            {
                "session_id": f"train-{n}",
                "messages": [*messages, {"role": "assistant", "content": answer}],
                "outcome": "success" if ok else "failure",
                "reward": 1.0 if ok else -1.0,
                "corrected_answer": "" if ok else corrected,
                "metadata": {"check": {"regex": rule(order)}},
            }
        )
    accepted = api("post", "/api/v1/trajectories/batch", {"items": items})["accepted"]
    print(
        f"reported {accepted} trajectories, {sum(i['outcome'] == 'failure' for i in items)} "
        "failures with a corrected answer"
    )

    # 2. Train now, default hyperparameters: the run chooses its learning rate and steps.
    settings = {
        "backend": "local",
        "base_model": "smollm2-135m",
        "min_new_samples": 1,
        "max_sample_tokens": 256,
        "search_budget_minutes": budget,
    }
    api("patch", "/api/v1/training/settings", settings)
    run_id = api("post", "/api/v1/training/runs")["id"]
    t0 = time.monotonic()
    training_run_execute(run_id=run_id)
    timings["training run (search included)"] = time.monotonic() - t0
    run = TrainingRun.objects.get(pk=run_id)
    if run.status != "succeeded":
        raise SystemExit(f"run #{run_id} {run.status}: {run.error}")
    print(f"\nrun #{run_id}: {run.outcomes.get('verdict')}")
    print(f"search (budget {budget} min): {run.search.get('reason', 'none')}")
    for t in run.search.get("trials", []):
        print(
            f"  lr {t['lr']:<7g} steps {t['steps']:>3}  run's held-out {t['passed']}/{t['n']}"
            f"  loss {t['loss']}  {t['train_seconds'] + t['score_seconds']:.0f} s"
        )

    # 3. The adapter, served as serve_adapter serves it, on the held-out wordings.
    adapter_server, adapter_url = model_server("smollm2-135m", run.adapter_ref)
    t0 = time.monotonic()
    with adapter_server:
        tuned = [chat(adapter_url, "adapter", m, args.max_tokens) for m, _, _ in held_items]
    timings["adapter on held-out"] = time.monotonic() - t0

    print("\nheld-out requests (other wordings), failures of the house rule:")
    rates = {}
    for label, answers in (("base model", base_answers), ("adapter (defaults)", tuned)):
        failed, n = failure_rate(answers, held_items)
        low, high = wilson(failed, n)
        rates[label] = failed / n
        print(
            f"  {label:<20} {failed}/{n} failed = {100 * failed / n:.0f} % "
            f"(95 % CI {100 * low:.0f}-{100 * high:.0f} %)"
        )
    cut = 1 - rates["adapter (defaults)"] / rates["base model"] if rates["base model"] else 0.0
    print(
        f"  failures cut by {100 * cut:.0f} % (target: at least 50 %): "
        f"{'MET' if cut >= 0.5 else 'NOT MET'}"
    )
    print(f"  e.g. {held_items[0][0][-1]['content']!r} → {tuned[0]!r}")
    print(
        "\ntimings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
