# The metrix-s2s image: the `metrix-s2s` command (worker, beat, dlq, ...) and the fake Metrix in
# scripts/, installed from the project's own files. docker-compose.yml runs it as worker, beat and
# fake-metrix.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the build and the image need (see .dockerignore for what stays out).
COPY pyproject.toml README.md ./
COPY metrix_s2s ./metrix_s2s
COPY scripts ./scripts

# Install the project, drop the build's leftovers, and add the user everything runs as.
RUN pip install --no-cache-dir . \
    && rm -rf build metrix_s2s.egg-info \
    && useradd --system --uid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin metrix

USER metrix

# `metrix-s2s worker` and `beat` exec Celery in place of themselves, so Celery is PID 1 and gets
# the SIGTERM of `docker stop` directly: a warm shutdown.
ENTRYPOINT []
CMD ["metrix-s2s", "worker"]
