"""orderonce: order events applied exactly once (Celery + Redis locks + PostgreSQL)."""
