"""The JSON Schema files in schemas/json/ are up to date, and they say what the models say."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from orderonce.errors import BadEvent
from schemas import generate
from schemas.events import CLOUD_EVENT, EVENT_TYPES
from schemas.parsing import parse_event

SAMPLES: dict[str, dict[str, Any]] = {
    "inventory.restocked": {"sku": "SKU-1", "quantity": 10},
    "order.created": {
        "customer_id": "cust-1",
        "currency": "EUR",
        "items": [{"sku": "SKU-1", "quantity": 2, "unit_price": "12.50"}],
    },
    "order.paid": {"payment_id": "pay-1", "amount": "25.00", "currency": "EUR"},
    "order.cancelled": {"reason": "customer changed their mind"},
    "order.shipped": {"shipment_id": "ship-1"},
    "order.refunded": {"refund_id": "ref-1", "amount": "25.00", "currency": "EUR"},
    "order.released": {"reason": "checked with the customer: two orders wanted"},
}


def sample(event_type: str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"evt-{event_type}",
        "source": "urn:test:producer",
        "time": "2024-05-01T12:00:00Z",
        "type": event_type,
        "data": copy.deepcopy(SAMPLES[event_type]),
    }
    if event_type.startswith("order."):
        event["subject"] = "order-1"
    return event


def with_float_unit_price() -> dict[str, Any]:
    event = sample("order.created")
    event["data"]["items"][0]["unit_price"] = 12.5
    return event


def schema_file(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((generate.JSON_DIR / name).read_text(encoding="utf-8"))
    return loaded


def type_file(event_type: str) -> str:
    return f"{event_type}.schema.json"


# --- the files ------------------------------------------------------------------------------


def test_schema_files_are_up_to_date() -> None:
    stale = generate.stale()
    assert not stale, (
        f"schemas/json is stale ({', '.join(stale)}): run `python -m schemas.generate` "
        "and commit the result"
    )


def test_api_documents_are_up_to_date() -> None:
    stale = generate.stale_api()
    assert not stale, (
        f"schemas/api is stale ({', '.join(stale)}): run `python -m schemas.generate` "
        "and commit the result"
    )


def test_stale_api_sees_a_changed_or_missing_document(tmp_path: Path) -> None:
    generate.write_api(tmp_path)
    assert generate.stale_api(tmp_path) == []
    (tmp_path / "openapi.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "asyncapi.json").unlink()
    assert generate.stale_api(tmp_path) == ["asyncapi.json", "openapi.json"]


def test_one_file_for_the_union_and_one_per_event_type() -> None:
    expected = {"cloudevent.schema.json"} | {type_file(t) for t in EVENT_TYPES}
    assert set(generate.render()) == expected
    assert {p.name for p in generate.JSON_DIR.glob("*.json")} == expected


def test_rendering_is_deterministic_and_canonical() -> None:
    first, second = generate.render(), generate.render()
    assert first == second
    for name, text in first.items():
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n", name


def test_the_union_file_is_the_union_schema() -> None:
    expected = generate.schema_of("cloudevent.schema.json", CLOUD_EVENT.json_schema())
    assert schema_file("cloudevent.schema.json") == expected


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_type_file_is_for_its_type(event_type: str) -> None:
    schema = schema_file(type_file(event_type))
    assert schema["properties"]["type"]["const"] == event_type
    assert "data" in schema["required"]
    # Other attributes are CloudEvents extensions: lower-case names, simple values only.
    assert schema["propertyNames"] == {"pattern": "^[a-z0-9]{1,20}$"}
    assert {s["type"] for s in schema["additionalProperties"]["anyOf"]} == {
        "string",
        "integer",
        "boolean",
    }


def test_money_is_a_string_in_the_schema() -> None:
    schema = schema_file(type_file("order.created"))
    unit_price = schema["$defs"]["LineItem"]["properties"]["unit_price"]
    assert unit_price["type"] == "string"
    assert "pattern" in unit_price


def test_stale_and_write(tmp_path: Path) -> None:
    directory = tmp_path / "json"
    everything = sorted(generate.render())
    assert generate.stale(directory) == everything  # nothing there yet

    written = generate.write(directory)
    assert sorted(p.name for p in written) == everything
    assert all(p.parent == directory for p in written)
    assert generate.stale(directory) == []

    (directory / type_file("order.paid")).write_text("{}\n", encoding="utf-8")
    (directory / type_file("order.shipped")).unlink()
    (directory / "order.deleted.schema.json").write_text("{}\n", encoding="utf-8")
    (directory / "README.md").write_text("not a schema\n", encoding="utf-8")
    assert generate.stale(directory) == sorted(
        [type_file("order.paid"), type_file("order.shipped"), "order.deleted.schema.json"]
    )

    generate.write(directory)
    assert generate.stale(directory) == []
    assert not (directory / "order.deleted.schema.json").exists()
    assert (directory / "README.md").exists()


def test_a_whitespace_change_is_stale(tmp_path: Path) -> None:
    generate.write(tmp_path)
    path = tmp_path / "cloudevent.schema.json"
    path.write_text(path.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    assert generate.stale(tmp_path) == ["cloudevent.schema.json"]


# --- the schemas validate what the models validate ------------------------------------------


@pytest.fixture(scope="module")
def jsonschema() -> Any:
    return pytest.importorskip("jsonschema", exc_type=ImportError)


def _validator(jsonschema: Any, name: str) -> Any:
    schema = schema_file(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_samples_are_valid_events(event_type: str) -> None:
    assert parse_event(json.dumps(sample(event_type))).type == event_type


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_type_schema_accepts_a_valid_event_of_its_type(
    jsonschema: Any, event_type: str
) -> None:
    errors = list(_validator(jsonschema, type_file(event_type)).iter_errors(sample(event_type)))
    assert errors == []


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_the_union_schema_accepts_a_valid_event_of_every_type(
    jsonschema: Any, event_type: str
) -> None:
    validator = _validator(jsonschema, "cloudevent.schema.json")
    assert list(validator.iter_errors(sample(event_type))) == []


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_type_schema_rejects_other_types(jsonschema: Any, event_type: str) -> None:
    validator = _validator(jsonschema, type_file(event_type))
    for other in EVENT_TYPES:
        if other != event_type:
            assert not validator.is_valid(sample(other)), other


@pytest.mark.parametrize("name", [type_file("order.created"), "cloudevent.schema.json"])
def test_a_float_unit_price_is_rejected(jsonschema: Any, name: str) -> None:
    event = with_float_unit_price()
    assert not _validator(jsonschema, name).is_valid(event)
    with pytest.raises(BadEvent) as caught:
        parse_event(json.dumps(event))
    assert caught.value.reason == "bad_schema"


@pytest.mark.parametrize(
    "name", [type_file("order.paid"), type_file("order.refunded"), "cloudevent.schema.json"]
)
@pytest.mark.parametrize("event_type", ["order.paid", "order.refunded"])
def test_a_float_amount_is_rejected(jsonschema: Any, name: str, event_type: str) -> None:
    event = sample(event_type)
    event["data"]["amount"] = 25.0
    assert not _validator(jsonschema, name).is_valid(event)


@pytest.mark.parametrize(
    "change",
    [
        {"quantity": 0},
        {"quantity": "2"},
        {"unit_price": "12.505"},
        {"unit_price": "-1.00"},
        {"discount": "1.00"},
    ],
)
def test_the_created_schema_rejects_bad_line_items(jsonschema: Any, change: dict[str, Any]) -> None:
    event = sample("order.created")
    event["data"]["items"][0].update(change)
    assert not _validator(jsonschema, type_file("order.created")).is_valid(event)
    with pytest.raises(BadEvent):
        parse_event(json.dumps(event))


# Events the model refuses (each is a dead letter) that the published schema lets through.
MODEL_ONLY_RULES: dict[str, tuple[str, dict[str, Any]]] = {
    "zero amount on paid": ("order.paid", {"amount": "0.00"}),
    "zero amount on refunded": ("order.refunded", {"amount": "0"}),
    "unknown currency on created": ("order.created", {"currency": "XYZ"}),
    "unknown currency on paid": ("order.paid", {"currency": "ABC"}),
}


@pytest.mark.parametrize("case", list(MODEL_ONLY_RULES))
def test_the_schema_rejects_what_the_model_rejects(jsonschema: Any, case: str) -> None:
    event_type, change = MODEL_ONLY_RULES[case]
    event = sample(event_type)
    event["data"].update(change)
    with pytest.raises(BadEvent):
        parse_event(json.dumps(event))
    assert not _validator(jsonschema, type_file(event_type)).is_valid(event)


# Every keyword of JSON Schema 2020-12's vocabularies (core, applicator, unevaluated,
# validation, meta-data, format annotation, content): what a strict validator knows.
KEYWORDS_2020_12 = frozenset(
    [
        "$schema",
        "$id",
        "$ref",
        "$anchor",
        "$dynamicRef",
        "$dynamicAnchor",
        "$vocabulary",
        "$comment",
        "$defs",
        "prefixItems",
        "items",
        "contains",
        "additionalProperties",
        "properties",
        "patternProperties",
        "dependentSchemas",
        "propertyNames",
        "if",
        "then",
        "else",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "unevaluatedItems",
        "unevaluatedProperties",
        "type",
        "const",
        "enum",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxContains",
        "minContains",
        "maxProperties",
        "minProperties",
        "required",
        "dependentRequired",
        "title",
        "description",
        "default",
        "deprecated",
        "readOnly",
        "writeOnly",
        "examples",
        "format",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
    ]
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "dependentSchemas")
_SCHEMA_LISTS = ("prefixItems", "allOf", "anyOf", "oneOf")
_SCHEMA_VALUES = [
    "items",
    "contains",
    "additionalProperties",
    "propertyNames",
    "if",
    "then",
    "else",
    "not",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contentSchema",
]


def _unknown_keywords(schema: Any, where: str = "#") -> list[str]:
    if not isinstance(schema, dict):
        return []
    found = [f"{where}/{k}" for k in schema if k not in KEYWORDS_2020_12]
    for key in _SCHEMA_MAPS:
        for name, sub in schema.get(key, {}).items():
            found += _unknown_keywords(sub, f"{where}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key, [])):
            found += _unknown_keywords(sub, f"{where}/{key}/{i}")
    for key in _SCHEMA_VALUES:
        found += _unknown_keywords(schema.get(key), f"{where}/{key}")
    return found


@pytest.mark.parametrize("name", sorted(generate.render()))
def test_only_standard_json_schema_keywords(name: str) -> None:
    """Ajv's strict mode and other strict validators refuse keywords outside the standard
    (pydantic's `discriminator` was one); the Node test validates with Ajv itself."""
    schema = schema_file(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert _unknown_keywords(schema) == []


def test_the_keyword_check_finds_a_non_standard_keyword() -> None:
    assert _unknown_keywords({"oneOf": [{"discriminator": {"propertyName": "type"}}]}) == [
        "#/oneOf/0/discriminator"
    ]
