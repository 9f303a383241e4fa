"""The project package: settings, URL roots, the one NinjaAPI, ASGI and WSGI entry points, the
Celery app (task discovery, beat schedule, ``redis_broker``: kombu's Redis transport with a
worker that survives losing Redis mid-task), Django's admin for projects, and what spans apps
(``projects.project_create``, ``manage.py seed_demo`` and ``create_project``). The only package
that imports every app; no app imports it.
"""

import os

# numpy's OpenBLAS starts a thread per core for every matrix product. Ours are small (a query
# against the skills, a group's evidence) and the cores are shared by web, workers and
# PostgreSQL, so those threads wait on each other: on a loaded 2-core machine one retrieval
# over 5,000 skills took 20 ms with them and 0.08 ms without. Set before numpy is first loaded;
# local training sets its own thread count (torch.set_num_threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Torch's OpenMP threads spin while they wait for each other; on busy shared cores that spinning
# is what they wait for (benchmarks/efficacy.py: one 40-token answer 48 s spinning, 3.3 s
# passive). Passive waiting costs little on an idle machine. Read when torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .celery import app as celery_app  # noqa: E402

__all__ = ["celery_app"]
