# The bot's image, for docker-compose.yml and deploy/kubernetes/. Every process kind runs from it: the
# command picks `run` (ingress, with or without workers) or `worker`.
# A pinned base: rebuilding gets the same Python and Debian until this line changes.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/app/data
WORKDIR /app
# A fixed numeric id, so Kubernetes' runAsNonRoot can verify it.
RUN useradd --create-home --uid 10001 bot && mkdir -p /app/data && chown bot /app/data

# The dependencies, in a layer of their own: it is rebuilt only when pyproject.toml changes, not with
# every change to the code (or the README, which the package build reads).
COPY pyproject.toml ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The bot itself, on top of the installed dependencies.
COPY README.md ./
COPY bot ./bot
RUN pip install --no-deps .

USER 10001
# 3000: the Events API with --http (and its probes); 9100: probes and metrics with --metrics-port.
EXPOSE 3000 9100
CMD ["slack-gpt-bot", "run"]
