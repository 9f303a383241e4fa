"""Do MetaClaw's two loops fix what they are shown? A house rule the agent's model never
follows, the failures reported with a person's corrected answer, and the failure rate on
held-out requests in other wordings: (a) the slow loop, base model vs the adapter of a run with
default settings; (b) the fast loop, without vs with an approved skill. Everything the agent
sends goes through MetaClaw's proxy, and base vs adapter is which policy version is active.

    python benchmarks/efficacy.py --quick                 # 30 train / 30 held-out per arm
    python benchmarks/efficacy.py --train 60 --held-out 60
    python benchmarks/efficacy.py --quick --search-demo   # the search keeps a later try
    python benchmarks/efficacy.py --quick --llm-base-url http://127.0.0.1:8000/v1 --llm-model m

The task family: a support agent answers account questions; the house rule, which its system
prompt does not state, is that every answer ends with the ticket code of the request's order,
``[TCK-<order number>]``. The checker is exact (a regex on the end of the answer).

The agent is an OpenAI client of MetaClaw's proxy (``POST /v1/chat/completions`` under the
project's runtime key, ``X-Session-Id`` per request). The project's upstream is the model
server of ``manage.py serve_adapter <project> --set-upstream``, which serves the active policy
version: the base model SmolLM2-135M-Instruct for a version without an adapter, the version's
LoRA adapter otherwise, under the model name the proxy sends for it.

1. The agent answers ``--train`` requests through the proxy (v1: no skill, no adapter); the
   checker reports each failure with ``POST /api/v1/incidents`` (the conversation, a person's
   corrected answer and the check) and each success with ``POST /api/v1/runtime/feedback``.
2. Held-out requests through the proxy, v1 active: the base arm of both halves.
3. The fast loop: the configured LLM (``--skill-writer-base-url``) writes a skill from the
   incidents' group (the synthesis task body runs here), or else a person's SKILL.md (in this
   file) is imported; it is approved (``POST /api/v1/skills/revisions/{id}/approve``), which
   makes v2 active, and the held-out requests go through the proxy again, the skill injected.
   Then v1 is rolled back to (``POST /api/v1/versions/1/rollback``), so the slow loop's
   candidate is built on the version without the skill.
4. The slow loop: ``POST /api/v1/training/runs`` (Train now) with the project's default
   hyperparameters (``--budget-minutes`` is the run's search budget); the worker's task body
   (``training_run_execute``) runs here and the search it made is printed. The candidate is
   promoted (``POST /api/v1/versions/{n}/promote``), ``serve_adapter`` is restarted for the
   new active version, and the held-out requests go through the proxy once more.

Both halves print failures/n, the rate with a Wilson 95 % interval, and the cut (target for
the slow loop: at least half). Database ``metaclaw_bench_efficacy`` unless ``DATABASE_URL``
names one (its name must begin with ``metaclaw_bench``: it is dropped and migrated first).

One file past 500 lines: ``main`` runs the four steps above in order on the servers and the
project it started (split, the pieces would pass all of that around); nothing else imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass

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
# The fast loop's skill when no LLM writes one: what a support lead would type.
PERSON_SKILL = """---
name: ticket-code-footer
description: Answering a customer's question about their Acme Cloud account or order
  (password, invoices, billing, plan, teammates, two-factor login, data export, email, usage).
---

Every answer to a customer ends with the ticket code of the request's order, in square
brackets: `[TCK-<order number>]`. For order 4821 the answer ends with `[TCK-4821]`, e.g.
"Open Settings > Billing > Invoices. [TCK-4821]". Nothing comes after the ticket code.
"""
AGENT = "acme-support"


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


@dataclass
class Answer:
    text: str
    version: int  # X-MetaClaw-Policy-Version: the version that served it
    model: str  # the model the upstream says answered


def proxy_chat(
    proxy: str, key: str, model: str, messages: list[dict], max_tokens: int, session: str
) -> Answer:
    """One chat completion as the agent's OpenAI client sends it: to MetaClaw's proxy."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(
        proxy + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {key}",
            "X-Session-Id": session,
            "X-Agent-Name": AGENT,
        },
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        payload = json.loads(response.read())
        version = int(response.headers["X-MetaClaw-Policy-Version"])
    text = payload["choices"][0]["message"]["content"] or ""
    return Answer(text=text, version=version, model=str(payload.get("model", "")))


def failures(answers: list[Answer], items: list) -> tuple[int, int]:
    failed = sum(
        not follows_rule(a.text, order) for a, (_, order, _) in zip(answers, items, strict=True)
    )
    return failed, len(items)


def rate_line(label: str, failed: int, n: int, wilson) -> str:
    low, high = wilson(failed, n)
    return (
        f"  {label:<34} {failed:>3}/{n} failed = {100 * failed / n:3.0f} % "
        f"(95 % CI {100 * low:.0f}-{100 * high:.0f} %)"
    )


def cut_of(before: tuple[int, int], after: tuple[int, int]) -> float:
    rate_before, rate_after = before[0] / before[1], after[0] / after[1]
    return 1 - rate_after / rate_before if rate_before else 0.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=(
            "Models: without --llm-base-url the agent's model is SmolLM2-135M-Instruct, served "
            "by `manage.py serve_adapter` as the project's upstream. --llm-base-url points the "
            "project's upstream (Settings: upstream base URL, key, model map '*' -> "
            "--llm-model) at any OpenAI-compatible model for the base and skill arms; the "
            "adapter arm is then still SmolLM2 with the run's adapter (the local backend "
            "trains SmolLM2 only), which the output says. --skill-writer-base-url (default: "
            "--llm-base-url) is the fast loop's LLM (OPENAI_BASE_URL / METACLAW_LLM_MODEL of "
            "the synthesis); without either, a person's SKILL.md written in this file is the "
            "skill. The output says which."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="30 train, 30 held-out per arm.")
    parser.add_argument(
        "--train", type=int, default=None, help="Requests the failures come from (default 60)."
    )
    parser.add_argument(
        "--held-out", type=int, default=None, help="Requests of each arm (default 60)."
    )
    parser.add_argument(
        "--budget-minutes",
        type=int,
        default=None,
        help="The run's search budget (default 6 with --quick, else 20).",
    )
    parser.add_argument(
        "--search-demo",
        action="store_true",
        help="Seed the run's search with its learning rates lowest first (1e-4, 3e-4, 1e-3), "
        "so that the first try does not pass every case and the search is seen moving on and "
        "keeping a later try. Settings stay the defaults otherwise.",
    )
    parser.add_argument(
        "--llm-base-url",
        default="",
        help="An OpenAI-compatible model as the agent's model: the project's upstream behind "
        "the proxy (and the skill writer unless --skill-writer-base-url says otherwise).",
    )
    parser.add_argument("--llm-model", default="smollm2-135m", help="Its model name.")
    parser.add_argument(
        "--llm-api-key",
        default=os.environ.get("OPENAI_API_KEY", ""),
        help="Its key (default: $OPENAI_API_KEY).",
    )
    parser.add_argument(
        "--skill-writer-base-url",
        default=None,
        help="The fast loop's LLM, which writes the skill from the incidents (default: "
        "--llm-base-url; neither, or '': a person's SKILL.md).",
    )
    parser.add_argument("--skill-writer-model", default=None, help="Default: --llm-model.")
    parser.add_argument("--skill-writer-api-key", default=None, help="Default: --llm-api-key.")
    parser.add_argument("--max-tokens", type=int, default=40, help="Per answer.")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="Threads of the model server and the training run (METACLAW_TORCH_THREADS; "
        "default: all cores). They wait for one another passively (OMP_WAIT_POLICY=PASSIVE "
        "unless set): on busy shared cores spinning threads were 6-15x slower.",
    )
    args = parser.parse_args()
    size = 30 if args.quick else 60
    args.train = args.train or size
    args.held_out = args.held_out or size
    if args.skill_writer_base_url is None:
        args.skill_writer_base_url = args.llm_base_url
    args.skill_writer_model = args.skill_writer_model or args.llm_model
    args.skill_writer_api_key = args.skill_writer_api_key or args.llm_api_key
    return args


def main() -> None:
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    # A timeout's SIGTERM unwinds like Ctrl-C, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = len(os.sched_getaffinity(0))
    threads = args.torch_threads or cores
    ENV["METACLAW_TORCH_THREADS"] = str(threads)
    # OpenMP threads that sleep instead of spinning while they wait for one another: on cores
    # shared with other jobs, spinning threads cost each other their time slices (one answer
    # of 40 tokens took 48 s with 2 spinning threads, 7.5 s with 1, 3.3 s with 2 passive).
    ENV.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Adapters of this run's own (run ids restart at 1 in the fresh database).
    ENV.setdefault("METACLAW_TRAINING_DIR", tempfile.mkdtemp(prefix="metaclaw-efficacy-"))
    print(
        f"{cores} cores, load average {os.getloadavg()[0]:.1f}: torch uses {threads} thread(s), "
        f"OMP_WAIT_POLICY={ENV['OMP_WAIT_POLICY']}"
    )
    budget = args.budget_minutes or (6 if args.quick else 20)
    started = time.monotonic()
    timings: dict[str, float] = {}
    # The servers run without any site-wide upstream or LLM: the project's upstream is the
    # only way out of the proxy, and the skill writer is this process's own setting.
    server_env = {k: v for k, v in ENV.items() if not k.startswith("OPENAI_")}
    server_env.update(UPSTREAM_BASE_URL="", UPSTREAM_API_KEY="")
    env = dict(server_env)
    if args.skill_writer_base_url:
        env.update(
            OPENAI_BASE_URL=args.skill_writer_base_url,
            OPENAI_API_KEY=args.skill_writer_api_key or "not-needed",
            METACLAW_LLM_MODEL=args.skill_writer_model,
            METACLAW_LLM_TIMEOUT="120",
        )
    ensure_database(server_env, fresh=True)
    django_setup(env)
    from django.test import Client

    from base import services
    from base.models import Project
    from metaclaw_site.projects import project_create
    from skills.synthesis.services import group_synthesize
    from training.runs import search as hp_search
    from training.runs.execute import training_run_execute
    from training.runs.models import TrainingRun
    from training.runs.outcomes import wilson
    from training.runs.services import training_run_record_search

    run_tag = uuid.uuid4().hex[:6]
    slug = f"efficacy-{run_tag}"
    project = project_create(name=f"Efficacy {run_tag}", slug=slug)
    admin_key = services.api_key_create(
        project=project, name="checker", scopes=["ingest", "admin"]
    ).secret
    runtime_key = services.api_key_create(project=project, name="agent", scopes=["runtime"]).secret
    client = Client(SERVER_NAME="localhost")

    def api(method: str, path: str, body: dict | None = None, *, key: str = admin_key) -> dict:
        response = getattr(client, method)(
            path,
            data=json.dumps(body or {}) if method != "get" else None,
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {key}",
        )
        assert response.status_code < 300, (path, response.status_code, response.content)
        return response.json()

    api(
        "patch",
        "/api/v1/training/settings",
        {
            "backend": "local",
            "base_model": "smollm2-135m",
            "min_new_samples": 1,
            "max_sample_tokens": 256,
            "search_budget_minutes": budget,
        },
    )
    train_items = requests_for(args.train, TRAIN_WORDINGS, seed=1)
    held_items = requests_for(args.held_out, HELD_OUT_WORDINGS, seed=2)

    proxy_port = free_port()
    proxy = f"http://127.0.0.1:{proxy_port}"
    proxy_command = [
        sys.executable, "-m", "uvicorn", "metaclaw_site.asgi:application",
        "--host", "127.0.0.1", "--port", str(proxy_port), "--workers", "1",
        "--no-access-log", "--log-level", "warning", "--lifespan", "off",
    ]  # fmt: skip

    def upstream_set_external() -> None:
        """The agent's model behind the proxy: the project's Settings (upstream URL, key and
        a model map sending every requested name to --llm-model)."""
        services.project_settings_update(
            project=Project.objects.get(pk=project.pk),
            changes={
                "upstream_base_url": args.llm_base_url,
                "upstream_api_key": args.llm_api_key,
                "upstream_model_map": {"*": args.llm_model},
            },
            actor=None,
            actor_label="efficacy benchmark",
        )

    def serve_adapter() -> Server:
        """``manage.py serve_adapter <slug> --set-upstream``: the active version's model."""
        if args.llm_base_url:  # the adapter arm: clear the external upstream's key and map
            services.project_settings_update(
                project=Project.objects.get(pk=project.pk),
                changes={"upstream_api_key": "", "upstream_model_map": {}},
                actor=None,
                actor_label="efficacy benchmark",
            )
        port = free_port()
        command = [sys.executable, "manage.py", "serve_adapter", slug, "--port", str(port)]
        return Server([*command, "--set-upstream"], server_env, port)

    def upstream_ready(expected: str) -> None:
        # serve_adapter sets the upstream just after binding its port; the proxy then sees
        # the project's new upstream once its API key cache (5 s) expires.
        deadline = time.monotonic() + 30
        while Project.objects.get(pk=project.pk).upstream_base_url != expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"the project's upstream never became {expected}")
            time.sleep(0.2)
        time.sleep(6)

    def answer_all(items: list, arm: str) -> list[Answer]:
        began = time.monotonic()
        answers = [
            proxy_chat(proxy, runtime_key, args.llm_model, m, args.max_tokens, f"{arm}-{n}")
            for n, (m, _, _) in enumerate(items)
        ]
        seconds = time.monotonic() - began
        print(f"  [{arm}: {len(items)} answers through the proxy in {seconds:.0f} s]")
        return answers

    def turns_with_skill(version: int) -> tuple[int, int]:
        time.sleep(2)  # the proxy records turns off the response path, in batches
        turns = api("get", f"/api/v1/turns?policy_version={version}&limit=200")["items"]
        return sum(bool(t["skills_injected"]) for t in turns), len(turns)

    agent_model = args.llm_base_url and f"{args.llm_model} at {args.llm_base_url}"
    with Server(proxy_command, server_env, proxy_port):
        # 1-2. v1 (no skill, no adapter): the train requests, then the held-out ones.
        base_server = None if args.llm_base_url else serve_adapter()
        if base_server is None:
            upstream_set_external()
            time.sleep(6)
        else:
            base_server.__enter__()
            upstream_ready(f"http://127.0.0.1:{base_server.port}/v1")
        try:
            t0 = time.monotonic()
            train_answers = answer_all(train_items, "train")
            timings["agent answers (train)"] = time.monotonic() - t0
            base_model = train_answers[0].model
            print(
                f"agent: {agent_model or base_model + ' (serve_adapter, v1)'} through MetaClaw's "
                f"proxy {proxy}/v1; {len(train_items)} train requests"
            )
            groups: set[int] = set()
            for n, ((messages, order, corrected), answer) in enumerate(
                zip(train_items, train_answers, strict=True)
            ):
                if follows_rule(answer.text, order):
                    api(
                        "post",
                        "/api/v1/runtime/feedback",
                        {"session_id": f"train-{n}", "outcome": "success", "reward": 1.0},
                        key=runtime_key,
                    )
                    continue
                reported = api(
                    "post",
                    "/api/v1/incidents",
                    {
                        "id": f"efficacy-{run_tag}-train-{n}",
                        "agent": {"name": AGENT},
                        "policy_version": answer.version,
                        "session_id": f"train-{n}",
                        "kind": "wrong_answer",
                        "severity": "medium",
                        "error": {
                            "type": "HouseRuleMissed",
                            "message": "The answer does not end with the order's ticket code "
                            "[TCK-<order number>].",
                        },
                        "messages": [*messages, {"role": "assistant", "content": answer.text}],
                        "metadata": {
                            "corrected_answer": corrected,
                            "check": {"regex": rule(order)},
                        },
                    },
                )
                groups.add(reported["group_id"])
            failed_train = failures(train_answers, train_items)[0]
            print(
                f"checker: {failed_train} failures reported as incidents with a corrected "
                f"answer (POST /api/v1/incidents, {len(groups)} group(s)), "
                f"{len(train_items) - failed_train} successes as feedback"
            )
            t0 = time.monotonic()
            base_answers = answer_all(held_items, "held-base")
            timings["held-out, v1 (base, no skill)"] = time.monotonic() - t0
            assert {a.version for a in base_answers} == {1}, "v1 must serve the base arm"

            # 3. The fast loop: a skill written and approved, v2 active.
            writer = ""
            revisions: list[dict] = []
            if args.skill_writer_base_url:
                t0 = time.monotonic()
                outcomes_of = []
                for group in sorted(groups):
                    try:
                        outcomes_of.append(group_synthesize(group_id=group, backoff=False))
                    except Exception as exc:  # noqa: BLE001 - reported, then a person's skill
                        outcomes_of.append(f"error {type(exc).__name__}: {exc}")
                timings["skill writer"] = time.monotonic() - t0
                revisions = api("get", "/api/v1/skills/revisions?status=proposed")["items"]
                writer = (
                    f"written by the configured LLM ({args.skill_writer_model} at "
                    f"{args.skill_writer_base_url}; synthesis: {', '.join(map(str, outcomes_of))})"
                )
                if not revisions:
                    print(f"the skill writer proposed no skill ({writer}); a person's is used")
            if not revisions:
                imported = api(
                    "post",
                    "/api/v1/skills/import",
                    {"files": {"ticket-code-footer/SKILL.md": PERSON_SKILL}},
                )
                revisions = [
                    api("get", f"/api/v1/skills/revisions/{imported['skills'][0]['revision_id']}")
                ]
                writer = "a person's text (PERSON_SKILL in benchmarks/efficacy.py, imported)"
            for revision in revisions:
                approved = client.post(
                    f"/api/v1/skills/revisions/{revision['id']}/approve",
                    data=json.dumps({"reason": "efficacy benchmark"}),
                    content_type="application/json",
                    HTTP_AUTHORIZATION=f"Bearer {admin_key}",
                )
                if approved.status_code == 422 and b"override_reason" in approved.content:
                    api(
                        "post",
                        f"/api/v1/skills/revisions/{revision['id']}/approve",
                        {"reason": "efficacy benchmark", "override_reason": "benchmark skill"},
                    )
                else:
                    assert approved.status_code < 300, approved.content
            skill_version = api("get", "/api/v1/runtime/policy", key=runtime_key)["version"]
            print(f"\nskill ({writer}), approved: v{skill_version} active")
            for revision in revisions:
                text = " ".join(revision["instructions"].split())
                print(f"  {revision['skill']}: {revision['description'][:100]!r}")
                print(f"    {text[:300]!r}")
            time.sleep(1)  # web processes drop their policy snapshot within 0.25 s
            t0 = time.monotonic()
            skill_answers = answer_all(held_items, "held-skill")
            timings[f"held-out, v{skill_version} (skill)"] = time.monotonic() - t0
            assert {a.version for a in skill_answers} == {skill_version}
            injected, recorded = turns_with_skill(skill_version)
            api("post", "/api/v1/versions/1/rollback", {"reason": "A/B over: back to v1"})
        finally:
            if base_server is not None:
                base_server.__exit__(None, None, None)

        # 4. The slow loop: Train now with default hyperparameters.
        run_id = api("post", "/api/v1/training/runs")["id"]
        run = TrainingRun.objects.get(pk=run_id)
        if args.search_demo:
            state = hp_search.new_state(float(run.hyperparameters["search_budget_seconds"]))
            state["grid"] = sorted(state["grid"])
            training_run_record_search(run_id=run_id, search=state)
        t0 = time.monotonic()
        training_run_execute(run_id=run_id)
        timings["training run (search included)"] = time.monotonic() - t0
        run = TrainingRun.objects.get(pk=run_id)
        if run.status != "succeeded":
            raise SystemExit(f"run #{run_id} {run.status}: {run.error}")
        print(f"\nrun #{run_id} (Train now, default settings): {run.outcomes.get('verdict')}")
        print_search(run.search, budget, demo=args.search_demo)

        candidate = run.candidate_version.number if run.candidate_version else None
        adapter_answers: list[Answer] = []
        if candidate is not None:
            api("post", f"/api/v1/versions/{candidate}/promote", {"reason": "A/B: the adapter"})
            adapter_server = serve_adapter()
            with adapter_server:
                upstream_ready(f"http://127.0.0.1:{adapter_server.port}/v1")
                t0 = time.monotonic()
                adapter_answers = answer_all(held_items, "held-adapter")
                timings[f"held-out, v{candidate} (adapter)"] = time.monotonic() - t0
            assert {a.version for a in adapter_answers} == {candidate}

    n = len(held_items)
    base = failures(base_answers, held_items)
    print(f"\nheld-out requests ({n} per arm, other wordings), failures of the house rule:")
    print(f"(a) the slow loop: v1 vs the run's candidate, promoted (agent's model: {base_model})")
    print(rate_line(f"v1, base model ({base_model})", *base, wilson))
    if adapter_answers:
        tuned = failures(adapter_answers, held_items)
        adapter_model = adapter_answers[0].model
        print(rate_line(f"v{candidate}, adapter (model {adapter_model!r})", *tuned, wilson))
        cut = cut_of(base, tuned)
        print(
            f"  failures cut by {100 * cut:.0f} % (target: at least 50 %): "
            f"{'MET' if cut >= 0.5 else 'NOT MET'}"
        )
        if args.llm_base_url:
            print("  (the adapter arm is SmolLM2-135M with the run's adapter: the local backend)")
        print(f"  e.g. {held_items[0][0][-1]['content']!r} → {adapter_answers[0].text!r}")
    else:
        print("  the run offered no candidate (not improved on its own held-out): NOT MET")
    skilled = failures(skill_answers, held_items)
    print(f"(b) the fast loop: v1 vs v{skill_version}, the same model with the approved skill")
    print(rate_line("v1, no skill", *base, wilson))
    print(rate_line(f"v{skill_version}, skill injected by the proxy", *skilled, wilson))
    cut = cut_of(base, skilled)
    print(
        f"  skill injected into {injected} of {recorded} recorded v{skill_version} turns; "
        f"failures cut by {100 * cut:.0f} %"
    )
    if cut < 0.5:
        print(
            f"  finding: {base_model} does not follow the injected skill's instruction here "
            "(the skill reached the prompt; the model did not act on it)"
        )
    print(f"  e.g. {held_items[0][0][-1]['content']!r} → {skill_answers[0].text!r}")
    print(
        "\ntimings: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total {time.monotonic() - started:.0f} s"
    )


def print_search(search: dict, budget: int, *, demo: bool) -> None:
    trials = search.get("trials", [])
    grid = ", ".join(f"{lr:g}" for lr in search.get("grid", []))
    order = "lowest first: --search-demo" if demo else "the default order"
    print(f"search the run made (budget {budget} min; learning rates {grid}, {order}):")
    for index, t in enumerate(trials):
        origin = (
            "from scratch"
            if t["continued_from"] is None
            else f"trained on from try {t['continued_from'] + 1}"
        )
        kept = "  <- kept" if index == search.get("kept") else ""
        print(
            f"  try {index + 1}: lr {t['lr']:<7g} {t['steps']:>3} steps ({origin}): run's "
            f"held-out {t['passed']}/{t['n']} passed, loss {t['loss']}, "
            f"{t['train_seconds'] + t['score_seconds']:.0f} s{kept}"
        )
    print(f"  why: {search.get('reason') or 'no search (pinned by hand)'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
