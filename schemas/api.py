"""The API documents of orderonce, built from the event models: OpenAPI 3.1 for the HTTP front
door (``orderonce ingest``) and AsyncAPI 3.0 for the broker channels. ``python -m
schemas.generate`` writes them to ``schemas/api/``; a test fails when they are stale. The front
door serves the same OpenAPI document at ``GET /openapi.json``.

Also here: the front door's problem types (RFC 9457), what each means and its HTTP status.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.events import (
    CLOUD_EVENT,
    InventoryRestocked,
    OrderCancelled,
    OrderCreated,
    OrderPaid,
    OrderRefunded,
    OrderReleased,
    OrderShipped,
)

VERSION = "1.0.0"
INGEST_QUEUE = "orderonce.ingest"
TASK_QUEUE = "orderonce.events"

# reason -> (HTTP status, title, what it means and what to do). The first group are the parser's
# reasons (the same as the dead letters'), the rest the front door's own.
PROBLEMS: dict[str, tuple[int, str, str]] = {
    "malformed_json": (
        400,
        "Not valid JSON",
        "The body, or an event in it, is not strict JSON: "
        "not UTF-8, duplicate keys, NaN, or nested deeper than 16 levels.",
    ),
    "bad_envelope": (
        400,
        "Not a valid CloudEvent",
        "A context attribute is missing or wrong "
        "(specversion, id, source, type, subject, time, extensions); `field` says "
        "which.",
    ),
    "unknown_type": (400, "Unknown event type", "`type` is not one of orderonce's event types."),
    "bad_schema": (
        400,
        "The data does not match its type",
        "`data` does not match the schema of the event's type (schemas/json/); `field` says where.",
    ),
    "bad_signature": (
        400,
        "Missing or wrong signature",
        "Signatures are required here and this "
        "event has none, or none made with a key this server holds.",
    ),
    "invalid_batch": (
        400,
        "Some events of the batch are invalid",
        "Nothing of the batch was stored; `errors` lists each bad event with its reason.",
    ),
    "not_a_cloudevent": (
        415,
        "Not a CloudEvent",
        "Send Content-Type "
        "application/cloudevents+json (structured), "
        "application/cloudevents-batch+json (batched), or the event's "
        "attributes as ce-* headers (binary).",
    ),
    "content_type_refused": (
        415,
        "Data must be JSON",
        "In binary mode the Content-Type is the data's, and orderonce's data is application/json.",
    ),
    "oversized": (
        413,
        "Too large",
        "The request, or an event in it, is over the size limit, or "
        "a batch has more events than allowed.",
    ),
    "unauthorized": (401, "A token is needed", "Send `Authorization: Bearer <token>`."),
    "source_not_allowed": (
        403,
        "Source not allowed for this token",
        "This token may publish only sources starting with its prefix; `errors` lists the events.",
    ),
    "id_conflict": (
        409,
        "This (source, id) is taken by other content",
        "An event with this "
        "source and id but different content (type, subject, data, datacontenttype, "
        "dataschema, idempotencykey) was accepted before. Give a new event a new "
        "id. Nothing of the request was stored.",
    ),
    "backlog": (
        429,
        "Too far behind",
        "The workers are behind by more than the set limit. "
        "Nothing was stored: send it again after Retry-After seconds.",
    ),
    "unavailable": (
        503,
        "Cannot store events now",
        "The database cannot be reached. `stored` "
        "is false when nothing was stored, null when the commit's outcome is "
        "unknown: sending the same events again is safe either way.",
    ),
}

_DATA_MODELS: dict[str, type[BaseModel]] = {
    "inventory.restocked": InventoryRestocked,
    "order.created": OrderCreated,
    "order.paid": OrderPaid,
    "order.cancelled": OrderCancelled,
    "order.shipped": OrderShipped,
    "order.refunded": OrderRefunded,
    "order.released": OrderReleased,
}


def _components(adapters: dict[str, TypeAdapter[Any]], ref: str) -> dict[str, Any]:
    """JSON Schemas of the models, definitions lifted to the document's components."""
    schemas: dict[str, Any] = {}
    for name, adapter in adapters.items():
        schema = _without_discriminator(adapter.json_schema(ref_template=ref))
        schemas.update(schema.pop("$defs", {}))
        schemas[name] = schema
    return dict(sorted(schemas.items()))


def _without_discriminator(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_discriminator(v) for k, v in schema.items() if k != "discriminator"}
    if isinstance(schema, list):
        return [_without_discriminator(v) for v in schema]
    return schema


def _adapters() -> dict[str, TypeAdapter[Any]]:
    adapters: dict[str, TypeAdapter[Any]] = {"CloudEvent": CLOUD_EVENT}
    adapters |= {m.__name__: TypeAdapter(m) for m in _DATA_MODELS.values()}
    return adapters


_PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details, with orderonce's reason code.",
    "required": ["type", "title", "status", "detail", "reason"],
    "properties": {
        "type": {"type": "string", "description": "/problems/{reason}"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "reason": {"type": "string", "enum": sorted(PROBLEMS)},
        "field": {"type": "string", "description": "The attribute or data field at fault."},
        "stored": {"type": ["boolean", "null"], "description": "503 only."},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "index": {"type": "integer", "description": "Position in the batch."},
                    "source": {"type": "string"},
                    "id": {"type": "string"},
                    "reason": {"type": "string"},
                    "field": {"type": "string"},
                    "detail": {"type": "string"},
                },
            },
        },
    },
}

_ACCEPTED_SCHEMA = {
    "type": "object",
    "required": ["accepted", "duplicates", "events"],
    "properties": {
        "accepted": {"type": "integer", "description": "Events stored now."},
        "duplicates": {
            "type": "integer",
            "description": "Events this server had accepted or applied before: nothing stored.",
        },
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "source": {"type": "string"},
                    "id": {"type": "string"},
                    "status": {"type": "string", "enum": ["accepted", "duplicate"]},
                },
            },
        },
    },
}

_CE_HEADERS = [
    ("ce-specversion", True, "1.0"),
    ("ce-id", True, "The event's id; with ce-source, its identity."),
    ("ce-source", True, "Who produced it, e.g. shop/checkout."),
    ("ce-type", True, "order.created, order.paid, ..."),
    ("ce-time", True, "RFC 3339, e.g. 2026-12-04T10:15:30Z."),
    ("ce-subject", False, "The order id (required for order.* types)."),
    ("ce-idempotencykey", False, "order.created: the checkout's idempotency key."),
    ("ce-dataschema", False, "A URI of the data's schema."),
    ("ce-signature", False, "v2=<hex HMAC-SHA256>, when the server requires signatures."),
]


def openapi() -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``orderonce ingest``."""
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}

    def refused(description: str, **headers: Any) -> dict[str, Any]:
        response: dict[str, Any] = {"description": description, "content": problem}
        if headers:
            response["headers"] = headers
        return response

    retry_after = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds."}}
    schemas = _components(_adapters(), "#/components/schemas/{model}")
    schemas |= {"Problem": _PROBLEM_SCHEMA, "Accepted": _ACCEPTED_SCHEMA}
    binary_data = {
        "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in _DATA_MODELS.values()]
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "orderonce front door",
            "version": VERSION,
            "description": "Publish order events as CloudEvents over HTTP (CloudEvents HTTP "
            "protocol binding 1.0, structured, binary and batched mode). A 202 means the "
            "events are durable; each takes effect exactly once. See docs/producers.md.",
        },
        "paths": {
            "/events": {
                "post": {
                    "operationId": "publishEvents",
                    "summary": "Publish one event, or a batch",
                    "parameters": [
                        {
                            "name": name,
                            "in": "header",
                            "required": False,
                            "description": (
                                "Binary mode" + (", required" if required else "") + f": {meaning}"
                            ),
                            "schema": {"type": "string"},
                        }
                        for name, required, meaning in _CE_HEADERS
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/cloudevents+json": {
                                "schema": {"$ref": "#/components/schemas/CloudEvent"}
                            },
                            "application/cloudevents-batch+json": {
                                "schema": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/CloudEvent"},
                                }
                            },
                            "application/json": {
                                "schema": binary_data,
                                "description": "Binary mode: the event's data, its attributes "
                                "in ce-* headers.",
                            },
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Stored durably (or stored before: duplicates).",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Accepted"}
                                }
                            },
                        },
                        "400": refused(
                            "Invalid: reason malformed_json, bad_envelope, "
                            "unknown_type, bad_schema, bad_signature, invalid_batch."
                        ),
                        "401": refused("No valid bearer token."),
                        "403": refused("A source this token may not publish."),
                        "409": refused("The (source, id) of an event is taken by other content."),
                        "413": refused("Too large."),
                        "415": refused("Not a CloudEvent, or data that is not JSON."),
                        "429": refused("Workers too far behind.", **retry_after),
                        "503": refused("Database unreachable.", **retry_after),
                    },
                    "security": [{}, {"bearer": []}],
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process serves.",
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "The database answers.",
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics.",
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
        },
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def asyncapi() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the broker channels producers may publish to."""
    schema_format = "application/schema+json;version=draft-2020-12"
    schemas = _components(_adapters(), "#/components/schemas/{model}")
    data = {
        "oneOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in _DATA_MODELS.values()]
    }
    attribute = {"type": "string"}
    binary_headers = {
        "type": "object",
        "description": "The event's attributes as application properties, prefixed "
        "cloudEvents_ (or cloudEvents:); content_type is the data's (application/json).",
        "required": [f"cloudEvents_{n}" for n in ("specversion", "id", "source", "type", "time")],
        "properties": {
            f"cloudEvents_{n}": attribute
            for n in (
                "specversion",
                "id",
                "source",
                "type",
                "time",
                "subject",
                "idempotencykey",
                "dataschema",
                "signature",
            )
        },
    }
    task_headers = {
        "type": "object",
        "required": ["task", "id", "lang"],
        "properties": {
            "task": {"const": "orderonce.process_event"},
            "id": {"type": "string", "description": "A unique message id (a UUID)."},
            "lang": {"const": "py"},
        },
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "orderonce broker channels",
            "version": VERSION,
            "description": "Where producers publish order events on the broker. Prefer the HTTP "
            "front door or orderonce.ingest; the Celery task message is for systems that "
            "already speak Celery. See docs/producers.md.",
        },
        "servers": {
            "rabbitmq": {"host": "localhost:5672", "protocol": "amqp", "protocolVersion": "0-9-1"},
            "redis": {"host": "localhost:6379", "protocol": "redis"},
        },
        "channels": {
            "ingest": {
                "address": INGEST_QUEUE,
                "description": "Plain CloudEvents (AMQP binding), RabbitMQ only: a durable "
                "queue the workers consume and apply exactly once.",
                "servers": [{"$ref": "#/servers/rabbitmq"}],
                "messages": {
                    "structured": {"$ref": "#/components/messages/CloudEventStructured"},
                    "binary": {"$ref": "#/components/messages/CloudEventBinary"},
                },
                "bindings": {
                    "amqp": {
                        "is": "queue",
                        "queue": {"name": INGEST_QUEUE, "durable": True},
                        "bindingVersion": "0.3.0",
                    }
                },
            },
            "tasks": {
                "address": TASK_QUEUE,
                "description": "Celery task messages (protocol 2, JSON): the worker's own "
                "queue. On Redis, a list: LPUSH the message envelope.",
                "servers": [{"$ref": "#/servers/rabbitmq"}, {"$ref": "#/servers/redis"}],
                "messages": {"task": {"$ref": "#/components/messages/CeleryTask"}},
            },
        },
        "operations": {
            "publishCloudEvent": {"action": "send", "channel": {"$ref": "#/channels/ingest"}},
            "publishTask": {"action": "send", "channel": {"$ref": "#/channels/tasks"}},
        },
        "components": {
            "schemas": schemas,
            "messages": {
                "CloudEventStructured": {
                    "contentType": "application/cloudevents+json",
                    "payload": {
                        "schemaFormat": schema_format,
                        "schema": {"$ref": "#/components/schemas/CloudEvent"},
                    },
                },
                "CloudEventBinary": {
                    "contentType": "application/json",
                    "headers": binary_headers,
                    "payload": {"schemaFormat": schema_format, "schema": data},
                },
                "CeleryTask": {
                    "contentType": "application/json",
                    "headers": task_headers,
                    "payload": {
                        "description": "[args, kwargs, embed]: args holds one string, the "
                        "CloudEvent as JSON.",
                        "type": "array",
                        "prefixItems": [
                            {
                                "type": "array",
                                "items": {"type": "string"},
                                "minItems": 1,
                                "maxItems": 1,
                            },
                            {"type": "object", "maxProperties": 0},
                            {"type": "object"},
                        ],
                    },
                },
            },
        },
    }
