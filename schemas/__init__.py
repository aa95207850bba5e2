"""The event contract: CloudEvents 1.0 envelopes carrying order events.

Pydantic models here are the source of truth; ``schemas/json/`` holds JSON Schema files
generated from them for producers written in other languages (``orderonce schemas``).
"""

from orderonce.errors import BadEvent
from schemas.events import (
    CLOUD_EVENT,
    EVENT_TYPES,
    CloudEvent,
    InventoryRestocked,
    InventoryRestockedEvent,
    LineItem,
    OrderCancelled,
    OrderCancelledEvent,
    OrderCreated,
    OrderCreatedEvent,
    OrderEvent,
    OrderPaid,
    OrderPaidEvent,
    OrderRefunded,
    OrderRefundedEvent,
    OrderReleased,
    OrderReleasedEvent,
    OrderShipped,
    OrderShippedEvent,
    ShippingAddress,
)
from schemas.parsing import content_hash, parse_event, same_content

__all__ = [
    "CLOUD_EVENT",
    "EVENT_TYPES",
    "BadEvent",
    "CloudEvent",
    "InventoryRestocked",
    "InventoryRestockedEvent",
    "LineItem",
    "OrderCancelled",
    "OrderCancelledEvent",
    "OrderCreated",
    "OrderCreatedEvent",
    "OrderEvent",
    "OrderPaid",
    "OrderPaidEvent",
    "OrderRefunded",
    "OrderRefundedEvent",
    "OrderReleased",
    "OrderReleasedEvent",
    "OrderShipped",
    "OrderShippedEvent",
    "ShippingAddress",
    "content_hash",
    "parse_event",
    "same_content",
]
