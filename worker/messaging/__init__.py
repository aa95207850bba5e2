"""The Celery side: the app (``create_app``), the tasks, the retry policy, the consumer and
buffered consumption, the Redis transport, RabbitMQ's dead-letter queue. Everything about
messages; nothing about what an event does (that is ``worker.protocol`` and below)."""
