"""The worker: Celery plumbing, the exactly-once protocol, and the order domain's effects."""
