"""The system under test as the chaos harness sees it: private servers, worker processes and a
relay, the faults that can be done to them, and the supervision that keeps them coming back
(restart what died, resume what was paused past the lock TTL)."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis
from sqlalchemy import Engine, text

from orderonce.dev.embedded import PrivatePostgres, PrivateRedis
from orderonce.dev.processes import RelayProcess, WorkerProcess
from worker.messaging.broker import is_amqp


@dataclass
class Tally:
    """What was done to the cluster, for the report."""

    started: float = field(default_factory=time.monotonic)
    faults: Counter[str] = field(default_factory=Counter)
    worker_deaths: int = 0
    timeline: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.faults[what.split()[0]] += 1
        self.timeline.append(f"{time.monotonic() - self.started:7.1f}s {what}")


class Cluster:
    def __init__(
        self,
        *,
        pg: PrivatePostgres,
        redis_server: PrivateRedis,
        lock_redis: PrivateRedis | None,
        broker_url: str,
        env: dict[str, str],
        logs: Path,
        pools: Sequence[str],
        worker_args: Sequence[str],
        entry: Sequence[str],
        with_relay: bool,
        lock_ttl_s: float,
        rng: random.Random,
        kombu_worker: bool = False,
    ) -> None:
        self.pg, self.redis, self.lock_redis = pg, redis_server, lock_redis
        self.broker_url, self.env, self.lock_ttl_s, self.rng = broker_url, env, lock_ttl_s, rng
        self.tally = Tally()
        self.workers = [
            WorkerProcess(
                f"chaos{n}",
                env,
                logs / f"worker{n}.log",
                pool,
                1 if pool == "solo" else 2,
                worker_args,
                entry,
            )
            for n, pool in enumerate(pools)
        ]
        # A worker on kombu's own Redis transport sharing the queue, never a fault's victim.
        self.protected: set[str] = set()
        if kombu_worker:
            kombu_env = {**env, "ORDERONCE_REDIS_TRANSPORT": "kombu"}
            spare = WorkerProcess(
                "kombu", kombu_env, logs / "worker-kombu.log", "solo", 1, worker_args, entry
            )
            self.workers.append(spare)
            self.protected.add(spare.name)
        self.relay = RelayProcess("relay", env, logs / "relay.log") if with_relay else None
        self.paused: dict[int, float] = {}  # process group -> when to resume it
        self.stopped_since: dict[int, float] = {}  # a process a failpoint stopped -> since
        self.lock_back_at: float | None = None

    def wait_ready(self) -> None:
        for w in self.workers:
            w.wait_ready(60)

    def inject(self, fault: str, engine: Engine) -> None:
        rng, note = self.rng, self.tally.note
        live = [w for w in self.workers if w.alive() and w.name not in self.protected]
        if fault == "kill_main" and live:
            victim = rng.choice(live)
            victim.signal_group(signal.SIGKILL)
            note(f"kill_main {victim.name}")
        elif fault == "kill_child":
            children = [(w, c) for w in live for c in w.children()]
            if children:
                owner, pid = rng.choice(children)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return  # it exited between the listing and the kill: nothing to kill
                note(f"kill_child {owner.name} pid {pid}")
        elif fault == "pause" and live:
            victim = rng.choice(live)
            victim.signal_group(signal.SIGSTOP)
            self.paused[victim.proc.pid] = time.monotonic() + self.lock_ttl_s + rng.uniform(0.5, 3)
            note(f"pause {victim.name} past the lock TTL")
        elif fault == "lock_wipe":
            self._wipe_locks()
        elif fault == "lock_outage" and self.lock_redis is not None:
            self.lock_redis.stop()
            self.lock_back_at = time.monotonic() + rng.uniform(2, 4)
            note("lock_outage (the lock Redis is down for a few seconds)")
        elif fault == "redis_restart":
            self.redis.restart()
            lost = "locks lost" if is_amqp(self.broker_url) else "broker queue and locks lost"
            note(f"redis_restart ({lost})")
        elif fault == "pg_restart":
            self.pg.stop("immediate")
            time.sleep(rng.uniform(0.2, 1.5))
            self.pg.start()
            note("pg_restart (immediate stop)")
        elif fault == "pg_terminate_backends":
            self._terminate_backends(engine)
        elif fault in ("warm_shutdown", "cold_shutdown") and live:
            victim = rng.choice(live)
            victim.signal_main(signal.SIGTERM if fault == "warm_shutdown" else signal.SIGQUIT)
            note(f"{fault} {victim.name}")
        elif fault == "relay_kill" and self.relay is not None:
            self.relay.kill()
            self.relay = RelayProcess("relay", self.env, self.relay.log)
            note("relay_kill (restarted)")

    def supervise(self) -> None:
        """Restart what died; resume what was paused, and what a failpoint stopped, once it has
        been stopped past the lock TTL; bring the lock Redis back after its outage."""
        now = time.monotonic()
        if self.lock_redis is not None and self.lock_back_at and now >= self.lock_back_at:
            self.lock_redis.start()
            self.lock_back_at = None
        for i, w in enumerate(self.workers):
            if not w.alive():
                self.tally.worker_deaths += 1
                w.kill()  # reap, and close its log
                self.workers[i] = w.restarted()
        if self.relay is not None and not self.relay.alive():
            self.relay.kill()
            self.relay = RelayProcess("relay", self.env, self.relay.log)
        for pgid, resume_at in list(self.paused.items()):
            if now >= resume_at:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGCONT)
                del self.paused[pgid]
        for w in self.workers:
            for pid in [w.proc.pid, *w.children()]:
                if not _stopped(pid):
                    self.stopped_since.pop(pid, None)
                    continue
                since = self.stopped_since.setdefault(pid, now)
                if now - since > self.lock_ttl_s + 1 and w.proc.pid not in self.paused:
                    os.kill(pid, signal.SIGCONT)
                    self.stopped_since.pop(pid, None)

    def heal(self) -> None:
        """End every fault: resume everything, every server up."""
        for w in self.workers:
            w.signal_group(signal.SIGCONT)
        self.paused.clear()
        self.pg.start()
        self.redis.start()
        if self.lock_redis is not None:
            self.lock_redis.start()

    def stop(self) -> None:
        self.heal()
        for w in self.workers:
            w.kill()
        if self.relay is not None:
            self.relay.kill()
        if self.lock_redis is not None:
            self.lock_redis.stop()

    def _wipe_locks(self) -> None:
        client = redis.Redis.from_url(self.env["ORDERONCE_REDIS_URL"], socket_timeout=2)
        try:
            keys = list(client.scan_iter("orderonce:lock:*"))
            if keys:
                client.delete(*keys)
            self.tally.note(f"lock_wipe {len(keys)} keys")
        except redis.RedisError:
            pass  # the lock Redis is down just now: nothing to wipe
        finally:
            client.close()

    def _terminate_backends(self, engine: Engine) -> None:
        with contextlib.suppress(Exception), engine.connect() as conn:
            ended = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND state IN ('active', 'idle in transaction')"
                )
            ).scalar_one()
            self.tally.note(f"pg_terminate_backends {ended}")


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"
