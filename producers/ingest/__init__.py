"""The HTTP front door (``orderonce ingest``): CloudEvents over HTTP into the outbox, durable
before the answer. ``app.create_app`` builds it; ``writer`` is its group commit."""
