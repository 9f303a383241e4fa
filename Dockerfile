# The MetaClaw image that docs/deploy.md's compose file runs: one image for every node kind (web,
# fast and slow workers, beat, the migrations); the compose file picks the command.
#
#   docker build -t metaclaw:latest .
#
# The code runs from /app, the checkout, installed in place (pip install -e): templates/,
# static/ and manage.py sit beside the packages there, and a plain "pip install ." would leave
# them behind (the wheel holds only the Python packages). WhiteNoise serves the static files
# from where they are, so there is no collectstatic step. Each container is given its
# SECRET_KEY; the image holds none. Local LoRA training (the "train" extra, PyTorch) is not in
# this image: its slow worker trains on Tinker. tests/test_deploy_doc.py runs these steps
# without Docker.
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app
RUN pip install -c constraints.txt -e .
RUN useradd --system --create-home --uid 10001 metaclaw \
    && mkdir -p /app/var && chown metaclaw /app/var
USER metaclaw

EXPOSE 8000
CMD ["uvicorn", "metaclaw_site.asgi:application", "--host", "0.0.0.0", "--port", "8000", \
     "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--lifespan", "off"]
