"""bench.batch_ceiling.record with a warm-up (make bench's "one batch of it cost" figure):
the warm-up's batches run, but neither their statements nor their time are in the recording."""

from __future__ import annotations

import json
import math
import uuid

from sqlalchemy import Engine

from bench.batch_ceiling import record
from bench.harness import demo_stream
from tests.servers import ServerUrls


def test_the_warm_up_is_applied_but_left_out_of_the_recording(
    db: Engine, servers: ServerUrls
) -> None:
    stream = demo_stream(f"W{uuid.uuid4().hex[:6].upper()}", 60, 0)
    bodies = [p.body.encode() for p in stream.restocks + stream.publications]
    warm_up = len(stream.restocks) + 20
    recording = record(
        db.url.render_as_string(hide_password=False), servers.redis_url, bodies, 10, warm_up
    )

    assert recording.events == len(bodies) - warm_up
    assert len(recording.transactions) == math.ceil((len(bodies) - warm_up) / 10)
    # The first kept transaction claims the first timed events, none of the warm-up's.
    claim = next(p for sql, p in recording.transactions[0] if "processed_messages" in sql)
    claimed = {row["event_id"] for row in json.loads(claim["rows"])}
    timed = {json.loads(b)["id"] for b in bodies[warm_up : warm_up + 10]}
    assert claimed and claimed <= timed
