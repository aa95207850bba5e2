"""Publishing order events: build a CloudEvent, send it, retry with the same id."""

from producers.publisher import Publisher, build_event

__all__ = ["Publisher", "build_event"]
