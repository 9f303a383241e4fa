"""Services enqueue Celery tasks by name (base.queue): the name must find its task in any
process, from any thread, on the first try."""

from __future__ import annotations

import json
import os
import sys

from tests.helpers import last_line_of_success

# A fresh process, where nothing has discovered the apps' tasks yet (as in a web process before
# its boot code or a management command): many threads look a task up at the same moment.
FIRST_LOOKUPS_AT_ONCE = """
import json, threading
import django
django.setup()
from base.queue import _task

barrier = threading.Barrier(8)
found, failed = [], []

def look_up():
    barrier.wait()
    try:
        found.append(_task("skills.tasks.propose_skill").name)
    except Exception as exc:
        failed.append(repr(exc))

threads = [threading.Thread(target=look_up) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"found": found, "failed": failed}))
"""


def test_a_task_is_found_by_name_from_many_threads_at_once_on_first_use():
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
        "DJANGO_SETTINGS_MODULE": "metaclaw_site.settings_test",
    }
    result = json.loads(
        last_line_of_success([sys.executable, "-c", FIRST_LOOKUPS_AT_ONCE], environment)
    )
    assert result == {"found": ["skills.tasks.propose_skill"] * 8, "failed": []}
