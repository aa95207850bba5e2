"""orderonce's Redis transport: kombu's, receiving atomically and many messages per round trip.

**Why.** kombu's Redis channel receives with ``BRPOP``, which removes a message from its queue,
and only afterwards records it as unacknowledged (``MULTI/ZADD unacked_index/HSET
unacked/EXEC``), in a second round trip. A worker killed between the two takes the message
with it: no queue holds it, no unacked record brings it back (celery/kombu#305; measured here:
2 of 4,000 events lost in 75 kills without the outbox). Here one Lua script pops up to as many
messages as the prefetch allows and records each as unacked in the same atomic step, so a
message is always either in its queue or in ``unacked`` (from where kombu's visibility-timeout
restore brings back a dead worker's messages).

**Compatible.** The records are kombu's own: ``unacked`` maps the message's delivery tag (set
when it was published) to ``[message, exchange, routing_key]``, ``unacked_index`` scores it by
time; ack, reject and restore are kombu's, unchanged. Workers with kombu's own transport,
older orderonce workers and any producer share the queues with this one.

**Waiting.** On an empty queue the channel waits with ``BLMOVE q q RIGHT RIGHT timeout``,
which blocks until the queue holds something and moves nothing (the last element onto itself),
then runs the script again. ``NOSCRIPT`` (a restarted Redis forgot the script) loads it again.
``global_keyprefix`` applies to every key the script and BLMOVE touch.

**Bad input.** A list entry that is not a kombu message (not JSON, nested too deep, no
delivery tag, a body that cannot be decoded) is not dropped and cannot stop the worker: it is
recorded and delivered as a message of content type ``UNREADABLE`` carrying the entry's bytes,
which the consumer dead-letters (``undecodable``) before acking it.

Also kept from before: one Redis client per channel instead of one per call (redis-py fills a
table of about 170 response callbacks per client object, redis/redis-py#3624).

Used for ``redis://`` brokers (``worker.messaging.broker.make_celery``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import NoScriptError

from worker.messaging.fast_json import loads

log = logging.getLogger(__name__)

TRANSPORT = "worker.messaging.transport:Transport"
# A list entry that is no kombu message, delivered as the body of a message of this type.
UNREADABLE = "application/x-orderonce-unreadable"
# Messages taken per round trip at most, whatever the prefetch allows.
MAX_PER_CALL = 256

# KEYS: unacked hash, unacked index, then the queue keys in the order to try.
# ARGV: how many at most, now (seconds), the queue name of each queue key, then a fresh prefix
#       for the tag an entry with none is given (the prefix, a dot and the entry's number).
# Returns queue, entry, tag for each message taken.
RECEIVE = r"""
local want = tonumber(ARGV[1])
local now = ARGV[2]
local nqueues = #KEYS - 2
local spare = ARGV[3 + nqueues]
local b64chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(data)
  return ((data:gsub('.', function(x)
    local r, b = '', x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and '1' or '0') end
    return r
  end) .. '0000'):gsub('%d%d%d?%d?%d?%d?', function(x)
    if #x < 6 then return '' end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == '1' and 2 ^ (6 - i) or 0) end
    return b64chars:sub(c + 1, c + 1)
  end) .. ({'', '==', '='})[#data % 3 + 1])
end
local out = {}
local taken = 0
for k = 1, nqueues do
  local queue = ARGV[2 + k]
  while taken < want do
    local entry = redis.call('RPOP', KEYS[2 + k])
    if not entry then break end
    taken = taken + 1
    local tag, exchange, key = nil, '', queue
    -- kombu writes a message's properties last, and the delivery tag last in them: found in
    -- the entry's tail, the tag needs no decode of the whole entry (which took half of this
    -- script's time), and the message goes back, if it must, to the queue it was taken from.
    -- The worker acks it by this tag, whatever else the entry says (Channel._payload).
    local at = string.find(entry, '"delivery_tag": "', math.max(1, #entry - 256), true)
    local close = at and string.find(entry, '"', at + 17, true)
    if close and close > at + 17 and not string.find(entry, '\\', at + 17, true) then
      tag = string.sub(entry, at + 17, close - 1)
    end
    if not tag then
      local ok, msg = pcall(cjson.decode, entry)
      if ok and type(msg) == 'table' and type(msg.properties) == 'table'
          and type(msg.properties.delivery_tag) == 'string' then
        tag = msg.properties.delivery_tag
        local info = msg.properties.delivery_info
        if type(info) == 'table' then
          if type(info.exchange) == 'string' then exchange = info.exchange end
          if type(info.routing_key) == 'string' then key = info.routing_key end
        end
      else
        tag = spare .. '.' .. taken
        entry = cjson.encode({
          body = b64(entry), ['content-encoding'] = 'binary',
          ['content-type'] = 'application/x-orderonce-unreadable', headers = {},
          properties = {body_encoding = 'base64', delivery_tag = tag, priority = 0,
                        delivery_info = {exchange = '', routing_key = queue}}})
      end
    end
    redis.call('HSET', KEYS[1], tag,
      '[' .. entry .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(key) .. ']')
    redis.call('ZADD', KEYS[2], now, tag)
    out[#out + 1] = queue
    out[#out + 1] = entry
    out[#out + 1] = tag
  end
end
return out
"""
RECEIVE_SHA = hashlib.sha1(RECEIVE.encode()).hexdigest()


def unreadable(entry: bytes, tag: str, queue: str) -> dict[str, Any]:
    """A kombu message carrying a list entry that is none, as the script builds it."""
    return {
        "body": base64.b64encode(entry).decode(),
        "content-encoding": "binary",
        "content-type": UNREADABLE,
        "headers": {},
        "properties": {
            "body_encoding": "base64",
            "delivery_tag": tag,
            "priority": 0,
            "delivery_info": {"exchange": "", "routing_key": queue},
        },
    }


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        # Recorded as unacked already, by the receive script, in the step that popped it.
        if self.channel.recorded.pop(delivery_tag, False):
            virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        super().append(message, delivery_tag)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    QoS = QoS
    _shared: Any = None  # the client built on the current pool
    _waiting = False  # the next receive command: BLMOVE (wait), else the script
    _sent: str | None = None
    _checked: tuple[dict[str, Any], Any] | None = None  # a payload and its message (_payload)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded: dict[str, bool] = {}
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # kombu

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared is None or self._shared.connection_pool is not self.pool:
            self._shared = self._create_client()  # type: ignore[no-untyped-call]  # kombu
        yield self._shared

    def _key(self, name: str) -> str:
        return f"{self.global_keyprefix}{name}" if self.global_keyprefix else name

    def _brpop_start(self, timeout: float | None = None) -> None:
        if timeout is None:
            timeout = self.brpop_timeout
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        pairs = [
            (self._q_for_pri(q, pri), q)  # type: ignore[no-untyped-call]  # kombu
            for pri in self.priority_steps
            for q in queues
        ]
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu's None default
        if self._waiting:
            first = self._key(pairs[0][0])
            self._sent = "BLMOVE"
            connection.send_command("BLMOVE", first, first, "RIGHT", "RIGHT", timeout or 0)
            return
        room = self.qos.can_consume_max_estimate()
        want = max(1, min(room if room else MAX_PER_CALL, MAX_PER_CALL))
        keys = [self._key(self.unacked_key), self._key(self.unacked_index_key)]
        keys += [self._key(k) for k, _ in pairs]
        self._sent = "EVALSHA"
        connection.send_command(
            "EVALSHA",
            RECEIVE_SHA,
            len(keys),
            *keys,
            want,
            repr(time.time()),
            *(q for _, q in pairs),
            uuid.uuid4().hex,
        )

    def _brpop_read(self, **options: Any) -> bool:
        sent = self._sent or "EVALSHA"
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent, **options)
            except NoScriptError:
                self.client.script_load(RECEIVE)  # Redis restarted and forgot it
                raise Empty() from None
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if sent == "BLMOVE":
                self._waiting = False  # something arrived, or the wait timed out: look
                raise Empty()
            if not reply:
                self._waiting = True
                raise Empty()
            self._deliver_all(reply)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # kombu's False default
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]  # kombu

    def _poll_error(self, type: str, **options: Any) -> None:
        if type == "LISTEN":
            self.subclient.parse_response()
        else:
            self.client.parse_response(self.client.connection, self._sent or type)

    def _deliver_all(self, reply: list[Any]) -> None:
        failure: Exception | None = None
        for i in range(0, len(reply), 3):
            queue, entry, tag = _text(reply[i]), reply[i + 1], _text(reply[i + 2])
            payload = self._payload(entry, tag, queue)
            self.recorded[tag] = True
            self._queue_cycle.rotate(queue)
            try:
                self.connection._deliver(payload, queue)
            except Exception as exc:  # the rest were taken too: deliver them first
                log.exception("delivering a received message failed")
                failure = failure or exc
            finally:
                self.recorded.pop(tag, None)
        if failure is not None:
            raise failure

    def _payload(self, entry: bytes | str, tag: str, queue: str) -> dict[str, Any]:
        """The message of a list entry; an entry Python cannot read as one (the script reads
        JSON more leniently) is rewritten in ``unacked`` as a message carrying its bytes."""
        raw = entry if isinstance(entry, bytes) else entry.encode("utf-8", "surrogatepass")
        try:
            payload = loads(raw)
            if not isinstance(payload, dict):
                raise TypeError("not an object")
            properties = payload.get("properties")
            if isinstance(properties, dict) and properties.get("delivery_tag") != tag:
                # The script read the tag from the entry's tail, and recorded the message
                # under it: an entry that names another tag elsewhere (no kombu writes one) is
                # acked, or given back, by the tag it is recorded under.
                properties["delivery_tag"] = tag
            # The body decodes, the properties are there: as kombu reads it on delivery. The
            # message is kept for that delivery (``basic_consume``), not built a second time.
            message = self.Message(payload, channel=self)  # type: ignore[no-untyped-call]
            self._checked = (payload, message)
            return payload
        except Exception:
            wrapped = unreadable(raw, tag, queue)
            self.client.hset(self.unacked_key, tag, json.dumps([wrapped, "", queue]))
            return wrapped

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        result = super().basic_consume(  # type: ignore[no-untyped-call]  # kombu
            queue, no_ack, callback, consumer_tag, **kwargs
        )
        delivers = self.connection._callbacks[queue]

        def deliver(payload: Any) -> Any:
            # kombu's delivery (basic_consume's own callback), with the message ``_payload``
            # built to check this payload instead of a second one.
            checked, self._checked = self._checked, None
            if checked is None or checked[0] is not payload:
                return delivers(payload)
            message = checked[1]
            if not no_ack:
                self.qos.append(message, message.delivery_tag)
            return callback(message)

        self.connection._callbacks[queue] = deliver
        return result


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Transport(kombu_redis.Transport):
    Channel = Channel
