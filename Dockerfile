# The image every orderonce service runs (worker, migrations, publisher).
FROM python:3.12-slim

RUN useradd --create-home --uid 10001 orderonce
WORKDIR /app
COPY pyproject.toml README.md ./
COPY orderonce ./orderonce
COPY worker ./worker
COPY producers ./producers
COPY schemas ./schemas
RUN pip install --no-cache-dir .

# Least privilege: the worker needs no root, no writable code and no shell.
USER orderonce
ENTRYPOINT ["orderonce"]
CMD ["worker"]
