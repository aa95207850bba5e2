"""docs/producers.md as its readers use it: every ``js test=NAME`` and ``sh test=NAME`` block run
as written (Node with the official CloudEvents SDK, curl, redis-cli, openssl) against a real front
door and worker, and the events it published applied; the signing test vectors reproduced and the
JSON Schemas compiled by implementations nobody here wrote (npm ``canonicalize`` with
``node:crypto``, Ajv in strict mode). The Node packages are tests/node's (``make install``)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import Engine

from orderonce.dev.processes import IngestProcess, free_port
from producers import Publisher, build_event
from producers.publisher import to_json
from tests import events
from tests.brokers import Broker
from tests.db import rows, scalar
from tests.workers import WorkerFactory, wait_until

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "producers.md"
NODE_DIR = ROOT / "tests" / "node"
SCHEMA_DIR = ROOT / "schemas" / "json"
VECTORS = ROOT / "schemas" / "vectors" / "signatures.json"
SIGNING_KEY = "node-producers-test-key"

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_DIR / "node_modules").is_dir(),
    reason="needs node on PATH and tests/node/node_modules (make install runs npm ci there)",
)

# The blocks each test runs; every block of the page must be in one (test_every_block_is_run).
HTTP_BLOCKS = ("curl-structured", "curl-binary", "curl-batch")  # then every http-* block
SIGNING_BLOCKS = ("sign-http", "sign-openssl")
AMQP_BLOCKS = ("amqp-structured", "amqp-binary", "celery-amqp")
REDIS_BLOCKS = ("celery-redis",)
# What a sh block runs besides bash.
TOOLS = {"curl-": "curl", "celery-redis": "redis-cli", "sign-openssl": "openssl"}

_BLOCK = re.compile(r"^```(js|sh) test=([a-z0-9-]+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks() -> dict[str, tuple[str, str]]:
    """Each runnable block of the page, in page order: name -> (language, code)."""
    found: dict[str, tuple[str, str]] = {}
    for lang, name, code in _BLOCK.findall(DOC.read_text(encoding="utf-8")):
        assert name not in found, f"two blocks named {name} in {DOC.name}"
        found[name] = (lang, code)
    return found


def http_blocks() -> list[str]:
    return [*HTTP_BLOCKS, *(n for n in blocks() if n.startswith("http-"))]


def test_every_block_is_run() -> None:
    named = set(blocks())
    run = {*http_blocks(), *SIGNING_BLOCKS, *AMQP_BLOCKS, *REDIS_BLOCKS}
    assert named == run, f"blocks no test runs: {named - run}; gone: {run - named}"


def missing_tool(name: str) -> str | None:
    """The program a sh block needs besides bash, when it is not installed here."""
    tool = next((t for prefix, t in TOOLS.items() if name.startswith(prefix)), None)
    return tool if tool is not None and shutil.which(tool) is None else None


def run_block(name: str, env: dict[str, str]) -> str:
    """Run a block as a reader would (Node from tests/node, so its imports resolve); its stdout."""
    lang, code = blocks()[name]
    if tool := missing_tool(name):
        pytest.skip(f"block {name} needs {tool}")
    command = ["node", "--input-type=module"] if lang == "js" else ["bash", "-e"]
    result = subprocess.run(
        command,
        input=code,
        cwd=NODE_DIR,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"block {name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object printed in ``text`` (response bodies, status codes around them)."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at != -1:
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            at = text.find("{", at + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        at = text.find("{", end)
    return found


def statuses(printed: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(source, id, status) of every event a block reports: the front door's answers
    (``events``), or {source, id} lines of blocks that publish to a broker ("sent")."""
    found = []
    for obj in printed:
        if "events" in obj:
            found += [(e["source"], e["id"], e["status"]) for e in obj["events"]]
        elif "source" in obj and "id" in obj:
            found.append((obj["source"], obj["id"], "sent"))
    return found


def wait_applied(db: Engine, keys: set[tuple[str, str]], what: str) -> None:
    def outcomes() -> list[tuple[object, ...]]:
        return rows(
            db,
            "SELECT source, event_id, outcome, reason FROM processed_messages"
            " WHERE (source, event_id) IN (SELECT * FROM unnest(:s, :i))",
            s=[k[0] for k in keys],
            i=[k[1] for k in keys],
        )

    wait_until(lambda: len(outcomes()) == len(keys), 60, f"{what}: every event processed")
    not_applied = [r for r in outcomes() if r[2] != "applied"]
    assert not not_applied, not_applied
    dead = rows(db, "SELECT reason, detail FROM dead_letters")
    assert not dead, dead


def post(url: str, body: dict[str, Any] | list[Any], content_type: str) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"{url}/events",
        data=json.dumps(body).encode(),
        headers={"Content-Type": content_type},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def on_hand(db: Engine, sku: str) -> int:
    return scalar(db, "SELECT coalesce(sum(on_hand), 0) FROM inventory WHERE sku = :sku", sku=sku)


def seed_stock(db: Engine, url: str, sku: str, quantity: int) -> None:
    restock = json.loads(to_json(events.restock(sku, quantity)))
    assert post(url, restock, "application/cloudevents+json")[0] == 202
    wait_until(lambda: on_hand(db, sku) == quantity, 30, f"{sku} stocked")


def test_http_blocks_publish_through_the_front_door(
    db: Engine, workers: WorkerFactory, ingest: IngestProcess
) -> None:
    workers.start()
    seed_stock(db, ingest.url, "SKU-001", 1000)
    env = {"ORDERONCE_URL": ingest.url}
    reported: dict[str, list[tuple[str, str, str]]] = {}
    for name in http_blocks():
        if missing_tool(name):  # curl: the Node blocks still run
            continue
        reported[name] = statuses(json_objects(run_block(name, env)))
        assert reported[name], f"block {name} printed no answer"
        assert all(s in ("accepted", "duplicate") for *_, s in reported[name]), reported[name]

    # The retry: the same id with a rebuilt time is stored once, the copy a duplicate.
    (source, id_, first), (*again, second) = reported["http-retry"]
    assert (first, tuple(again), second) == ("accepted", (source, id_), "duplicate")
    keys = {(s, i) for found in reported.values() for s, i, _ in found}
    wait_applied(db, keys, "the HTTP blocks")
    assert on_hand(db, "SKU-002") == 40  # http-structured's restock

    if "curl-structured" in reported:  # what the page says of resends and reused ids
        again_objects = json_objects(run_block("curl-structured", env))
        assert statuses(again_objects) == [("warehouse/berlin", "restock-0001", "duplicate")]
        conflicting = {
            "specversion": "1.0",
            "id": "restock-0001",
            "source": "warehouse/berlin",
            "type": "inventory.restocked",
            "time": "2026-12-04T09:00:00Z",
            "data": {"sku": "SKU-001", "quantity": 600},
        }
        status, problem = post(ingest.url, conflicting, "application/cloudevents+json")
        assert (status, problem["reason"]) == (409, "id_conflict")
        shipped = scalar(
            db, "SELECT count(*) FROM orders WHERE order_id = 'ORD-1001' AND status = 'shipped'"
        )
        assert shipped == 1


@pytest.fixture
def signing_front_door(db: Engine, broker: Broker, tmp_path: Path) -> Iterator[IngestProcess]:
    """A front door that requires events signed with SIGNING_KEY."""
    env = {**os.environ, **broker.env, "ORDERONCE_VERIFY_KEYS": SIGNING_KEY}
    front = IngestProcess("ingest-signed", env, tmp_path / "ingest-signed.log", free_port())
    try:
        front.wait_ready()
        yield front
    finally:
        front.terminate()


def test_signing_blocks(
    db: Engine, workers: WorkerFactory, signing_front_door: IngestProcess
) -> None:
    workers.start(ORDERONCE_VERIFY_KEYS=SIGNING_KEY)
    url = signing_front_door.url
    unsigned = json.loads(to_json(events.restock("SKU-005", 1)))
    status, problem = post(url, unsigned, "application/cloudevents+json")
    assert (status, problem["reason"]) == (400, "bad_signature")

    printed = run_block("sign-http", {"ORDERONCE_URL": url, "ORDERONCE_SIGNING_KEY": SIGNING_KEY})
    reported = statuses(json_objects(printed))
    assert [s for *_, s in reported] == ["accepted", "accepted"], printed
    wait_applied(db, {(s, i) for s, i, _ in reported}, "the signed events")

    openssl = run_block("sign-openssl", {})
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert any(v["signature"].removeprefix("v2=") in openssl for v in vectors), openssl


def queue_exists(url: str, name: str) -> bool:
    with Connection(url) as conn:
        try:
            conn.default_channel.queue_declare(queue=name, passive=True)
        except conn.channel_errors:
            return False
    return True


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_amqp_blocks(db: Engine, broker: Broker, workers: WorkerFactory) -> None:
    workers.start()
    publisher = Publisher(broker.url, broker.settings)
    try:
        publisher.publish(events.restock("SKU-003", 100))
    finally:
        publisher.close()
    wait_until(lambda: on_hand(db, "SKU-003") == 100, 30, "SKU-003 stocked")
    # The worker declares orderonce.ingest from a thread of its own, soon after it is ready.
    ingest_queue = broker.settings.ingest_queue
    wait_until(lambda: queue_exists(broker.url, ingest_queue), 30, f"{ingest_queue} declared")
    env = {
        "ORDERONCE_AMQP_URL": broker.url,
        "ORDERONCE_QUEUE": broker.settings.queue,
        "ORDERONCE_INGEST_QUEUE": ingest_queue,
    }
    keys: set[tuple[str, str]] = set()
    for name in AMQP_BLOCKS:
        sent = statuses(json_objects(run_block(name, env)))
        assert len(sent) == 1, f"block {name}: {sent}"
        keys |= {(s, i) for s, i, _ in sent}
    wait_applied(db, keys, "the AMQP blocks")
    assert on_hand(db, "SKU-003") == 112  # amqp-structured's restock
    assert on_hand(db, "SKU-004") == 8  # celery-amqp's restock


def test_celery_redis_block(db: Engine, broker: Broker, workers: WorkerFactory) -> None:
    """The page's Redis worked example, pushed as written onto the queue it names."""
    if not broker.url.startswith("redis://"):
        pytest.skip(f"redis-cli -u needs a redis:// URL, not {broker.url}")
    workers.start(ORDERONCE_QUEUE="orderonce.events")
    code = blocks()["celery-redis"][1]
    envelope = json.loads(code[code.index("'{") + 1 : code.rindex("}'") + 1])
    args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
    event = json.loads(args[0])
    assert kwargs == {} and envelope["headers"]["task"] == "orderonce.process_event"
    run_block("celery-redis", {"ORDERONCE_REDIS_URL": broker.url})
    wait_applied(db, {(event["source"], event["id"])}, "the Redis worked example")
    assert on_hand(db, event["data"]["sku"]) == event["data"]["quantity"]


def test_signature_vectors_reproduced_by_node_canonicalize() -> None:
    result = subprocess.run(
        ["node", "vectors.mjs", str(VECTORS)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    reproduced = [json.loads(line) for line in result.stdout.splitlines()]
    vectors = json.loads(VECTORS.read_text(encoding="utf-8"))
    assert len(reproduced) == len(vectors) > 0, result.stderr
    for vector, mine in zip(vectors, reproduced, strict=True):
        assert mine["canonical"] == vector["canonical"], vector["description"]
        assert mine["signature"] == vector["signature"], vector["description"]
    assert result.returncode == 0, result.stderr


def _samples() -> list[dict[str, Any]]:
    """Events every schema must take (the vectors', one of each type), and some it must not."""
    order = events.uid("ORD")
    valid = [json.loads(to_json(e)) for e in events_of_every_type(order)]
    valid += [v["event"] for v in json.loads(VECTORS.read_text(encoding="utf-8"))]
    paid = valid[2]
    invalid = {
        "money as a JSON number": {**paid, "data": {**paid["data"], "amount": 9.99}},
        "no time": {k: v for k, v in paid.items() if k != "time"},
        "an unknown data field": {**paid, "data": {**paid["data"], "tip": "1.00"}},
        "an upper-case extension name": {**paid, "traceParent": "00-1"},
    }
    return [{"name": f"{e['type']} {e['id']}", "event": e, "valid": True} for e in valid] + [
        {"name": name, "event": e, "valid": False} for name, e in invalid.items()
    ]


def events_of_every_type(order: str) -> list[Any]:
    source = "shop/checkout"
    return [
        events.restock("SKU-001", 5),
        events.created(order, [("SKU-001", 2, "9.99")]),
        events.paid(order, "19.98"),
        events.shipped(order),
        events.cancelled(order),
        events.refunded(order, "19.98"),
        build_event("order.released", {"reason": "checked by hand"}, source=source, subject=order),
    ]


def run_schemas(directory: Path, samples: list[dict[str, Any]]) -> dict[str, Any]:
    result = subprocess.run(
        ["node", "schemas.mjs", str(directory)],
        cwd=NODE_DIR,
        input=json.dumps(samples),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)
    return found


def test_schemas_compile_in_ajv_strict_mode() -> None:
    samples = _samples()
    assert {s["event"]["type"] for s in samples if s["valid"]} == {
        p.name.removesuffix(".schema.json") for p in SCHEMA_DIR.glob("*.schema.json")
    } - {"cloudevent"}
    found = run_schemas(SCHEMA_DIR, samples)
    assert found["warnings"] == []
    assert sorted(found["compiled"]) == sorted(p.name for p in SCHEMA_DIR.glob("*.json"))
    wrong = [s for s in found["samples"] if s["valid"] != s["expected"]]
    assert not wrong, wrong


def test_ajv_strict_mode_is_really_on(tmp_path: Path) -> None:
    """The check above would catch a non-standard keyword (pydantic's ``discriminator``)."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "discriminator": {}}
    (tmp_path / "loose.schema.json").write_text(json.dumps(schema), encoding="utf-8")
    found = run_schemas(tmp_path, [])
    assert found["compiled"] == [] and "discriminator" in " ".join(found["warnings"])
