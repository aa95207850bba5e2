# The image every orderonce service in compose.yaml runs (worker, migrations, relay, publisher):
# ENTRYPOINT is the orderonce CLI, so a service's `command` is just the subcommand.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 orderonce
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orderonce ./orderonce
COPY worker ./worker
COPY producers ./producers
COPY schemas ./schemas
# Runtime dependencies only: no `[dev]` extra (no test, lint or type-checking tools) and no
# `[embedded]` one (compose sets every ORDERONCE_*_URL; without them a command says so).
RUN pip install .

# Least privilege: the worker needs no root and no writable code.
USER orderonce
WORKDIR /home/orderonce
ENTRYPOINT ["orderonce"]
CMD ["worker"]
