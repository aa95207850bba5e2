"""What ``bench.throughput`` makes of its runs: medians and ratios, the printed table, and the
stamped tables of docs/performance.md (``python -m bench.report --write``: throughput, the
front door, the duplicate check), rendered from the raw results in bench/results/ so that no
figure there is typed by hand."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3)


def median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return median(known) if len(known) == len(values) and known else None


def summarize(runs: list[dict[str, Any]], workers: tuple[int, ...]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for n in workers:
        at = [r for r in runs if r["workers"] == n]

        def med(system: str, *path: str, rows: list[dict[str, Any]] = at) -> float:
            values = []
            for r in rows:
                v: Any = r[system]
                for key in path:
                    v = v[key]
                values.append(float(v))
            return median(values)

        def spread(system: str, key: str, rows: list[dict[str, Any]] = at) -> list[float]:
            return [min(r[system][key] for r in rows), max(r[system][key] for r in rows)]

        summary[str(n)] = {
            "plain_celery": {
                "events_per_s": med("plain_celery", "events_per_s"),
                "events_per_s_range": spread("plain_celery", "events_per_s"),
                "p50_ms": med("plain_celery", "latency", "p50_ms"),
                "p99_ms": med("plain_celery", "latency", "p99_ms"),
                "max_rss_mib": max(max(r["plain_celery"]["rss_mib"]) for r in at),
            },
            "plain_celery_solo": {
                "events_per_s": med("plain_celery_solo", "events_per_s"),
                "events_per_s_range": spread("plain_celery_solo", "events_per_s"),
                "p50_ms": med("plain_celery_solo", "latency", "p50_ms"),
                "p99_ms": med("plain_celery_solo", "latency", "p99_ms"),
                "max_rss_mib": max(max(r["plain_celery_solo"]["rss_mib"]) for r in at),
            },
            "orderonce": {
                "events_per_s": med("orderonce", "events_per_s"),
                "events_per_s_range": spread("orderonce", "events_per_s"),
                "p50_ms": med("orderonce", "latency", "p50_ms"),
                "p99_ms": med("orderonce", "latency", "p99_ms"),
                "to_transaction_start_p50_ms": med(
                    "orderonce", "latency", "to_transaction_start", "p50_ms"
                ),
                "max_rss_mib": max(max(r["orderonce"]["rss_mib"]) for r in at),
            },
            "orderonce_batch": {
                "events_per_s": med("orderonce_batch", "events_per_s"),
                "events_per_s_range": spread("orderonce_batch", "events_per_s"),
                "p50_ms": med("orderonce_batch", "latency", "p50_ms"),
                "p99_ms": med("orderonce_batch", "latency", "p99_ms"),
                "offered_per_s": med("orderonce_batch", "latency", "offered_per_s"),
                "max_rss_mib": max(max(r["orderonce_batch"]["rss_mib"]) for r in at),
                "verify_ok": all(r["orderonce_batch"]["verify_ok"] for r in at),
            },
            "batch_db_ceiling": {
                "events_per_s": med("batch_db_ceiling", "events_per_s"),
                "events_per_s_range": spread("batch_db_ceiling", "events_per_s"),
                "p50_ms": med("batch_db_ceiling", "batch_p50_ms"),
                "p99_ms": med("batch_db_ceiling", "batch_p99_ms"),
                "server_cpu_us_per_event": median_or_none(
                    [r["batch_db_ceiling"]["server_cpu_us_per_event"] for r in at]
                ),
            },
            "batch_cpu_us_per_event": {
                whose: median_or_none([r["orderonce_batch"]["cpu_us_per_event"][whose] for r in at])
                for whose in ("workers", "database", "redis", "total")
            },
            "db_ceiling": {
                "commits_per_s": med("db_ceiling", "commits_per_s"),
                "commits_per_s_range": spread("db_ceiling", "commits_per_s"),
                "p50_ms": med("db_ceiling", "transaction", "p50_ms"),
                "p99_ms": med("db_ceiling", "transaction", "p99_ms"),
            },
            "redis_commands_per_event": {
                "plain_celery": med("plain_celery", "redis_commands_per_event", "total"),
                "orderonce": med("orderonce", "redis_commands_per_event", "total"),
                "orderonce_batch": med("orderonce_batch", "redis_commands_per_event", "total"),
            },
            "b_over_a": median([r["b_over_a"] for r in at]),
            "b_over_a_solo": median([r["b_over_a_solo"] for r in at]),
            "b_over_c": median([r["b_over_c"] for r in at]),
            "batch_over_a": median([r["batch_over_a"] for r in at]),
            "batch_over_c": median([r["batch_over_c"] for r in at]),
            "batch_over_batch_c": median([r["batch_over_batch_c"] for r in at]),
        }
        summary[str(n)]["orderonce"] |= {
            "trickle_p50_ms": med("orderonce", "trickle_latency", "p50_ms"),
            "trickle_p99_ms": med("orderonce", "trickle_latency", "p99_ms"),
            "offered_per_s": med("orderonce", "latency", "offered_per_s"),
            "verify_ok": all(r["orderonce"]["verify_ok"] for r in at),
        }
        paced = [r["orderonce"]["latency"].get("cpu_us_per_event") for r in at]
        if all(paced):  # runs before 2026-12-07 did not measure it
            summary[str(n)]["orderonce"]["paced_cpu"] = {
                whose: median_or_none([p[whose] for p in paced])
                for whose in ("workers", "database", "redis", "benchmark", "total", "cores_busy")
            }
        waits = [r["orderonce"]["latency"].get("lock_waits") for r in at]
        if all(waits):  # runs before 2026-12-07 did not measure it
            summary[str(n)]["orderonce"]["lock_waits_share"] = median_or_none(
                [w["waiting_share"] for w in waits]
            )
        if all("orderonce_prefork" in r for r in at):
            summary[str(n)] |= {
                "orderonce_prefork": {
                    "events_per_s": med("orderonce_prefork", "events_per_s"),
                    "events_per_s_range": spread("orderonce_prefork", "events_per_s"),
                    "p50_ms": med("orderonce_prefork", "latency", "p50_ms"),
                    "p99_ms": med("orderonce_prefork", "latency", "p99_ms"),
                    "offered_per_s": med("orderonce_prefork", "latency", "offered_per_s"),
                    "protocol_mean_ms": med("orderonce_prefork", "in_worker", "protocol_mean_ms"),
                    "task_mean_ms": med("orderonce_prefork", "in_worker", "task_mean_ms"),
                    "max_rss_mib": max(max(r["orderonce_prefork"]["rss_mib"]) for r in at),
                    "verify_ok": all(r["orderonce_prefork"]["verify_ok"] for r in at),
                    "redis_commands_per_event": med(
                        "orderonce_prefork", "redis_commands_per_event", "total"
                    ),
                },
                "prefork_over_a": median([r["prefork_over_a"] for r in at]),
                "prefork_over_c": median([r["prefork_over_c"] for r in at]),
            }
    first = summary[str(workers[0])]
    summary["scaling"] = {
        system: {
            str(n): round(summary[str(n)][system][key] / first[system][key], 2) for n in workers
        }
        for system, key in (
            ("plain_celery", "events_per_s"),
            ("plain_celery_solo", "events_per_s"),
            ("orderonce", "events_per_s"),
            ("orderonce_batch", "events_per_s"),
            ("orderonce_prefork", "events_per_s"),
            ("db_ceiling", "commits_per_s"),
            ("batch_db_ceiling", "events_per_s"),
        )
        if system in first
    }
    return summary


def verified(run: dict[str, Any]) -> bool:
    modes = ("orderonce", "orderonce_batch", "orderonce_prefork")
    return all(run[m]["verify_ok"] for m in modes if m in run)


def print_results(results: dict[str, Any]) -> None:
    m, o, summary = results["machine"], results["options"], results["summary"]
    print(
        f"\nthroughput: {o['events']} events per drain"
        f" ((b): {o.get('stream_events', o['events'])}), median of {o['runs']} runs;"
        f" {m['nproc']} cores, Python {m['python']}, Celery {m['celery']},"
        f" PostgreSQL {m['postgres']['server_version']}, Redis {m['redis_server']}"
    )
    print(
        f"  {'workers':>7}  {'':34}{'events/s':>10}{'(range)':>13}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'RSS MiB':>9}"
    )
    names = {
        "plain_celery": "(a) plain Celery prefork, no-op task",
        "plain_celery_solo": "(a') plain Celery, N solo processes",
        "orderonce": "(b) orderonce worker (default)",
        "orderonce_batch": "(b') orderonce batch mode",
        "orderonce_prefork": "(b'') orderonce --pool prefork",
        "db_ceiling": "(c) database ceiling (commits/s)",
        "batch_db_ceiling": "(c') batch mode's database ceiling",
    }
    for n in o["workers"]:
        row = summary[str(n)]
        for system, name in names.items():
            if system not in row:
                continue
            s = row[system]
            rate = s.get("events_per_s", s.get("commits_per_s"))
            low, high = s.get("events_per_s_range", s.get("commits_per_s_range"))
            spread = f"{low:.0f}-{high:.0f}"
            rss = f"{s['max_rss_mib']:9.0f}" if "max_rss_mib" in s else f"{'':9}"
            print(
                f"  {n:>7}  {name:34}{rate:10.0f}{spread:>13}{s['p50_ms']:9.1f}{s['p99_ms']:9.1f}"
                f"{rss}"
            )
        print(
            f"  {'':7}  b/a {row['b_over_a']:.2f}   b/a' {row['b_over_a_solo']:.2f}"
            f"   b/c {row['b_over_c']:.2f}"
            f"   b'/a {row['batch_over_a']:.2f}   b'/c {row['batch_over_c']:.2f}"
            + f"   b'/c' {row['batch_over_batch_c']:.2f}"
            + (
                f"   b''/a {row['prefork_over_a']:.2f}   b''/c {row['prefork_over_c']:.2f}"
                if "prefork_over_a" in row
                else ""
            )
        )
        b = row["orderonce"]
        print(
            f"  {'':7}  (b) at a trickle of 10 events/s: p50 {b['trickle_p50_ms']:.1f} ms,"
            f" p99 {b['trickle_p99_ms']:.1f} ms"
        )
        paced = b.get("paced_cpu")
        if paced and paced["total"] is not None:
            print(
                f"  {'':7}  (b) at half its drain rate: {paced['cores_busy']:.2f} of"
                f" {m['nproc']} cores busy; CPU per event: workers {paced['workers']:.0f} µs,"
                f" PostgreSQL {paced['database']:.0f} µs, Redis {paced['redis']:.0f} µs, this"
                f" benchmark {paced['benchmark']:.0f} µs"
            )
        if b.get("lock_waits_share") is not None:
            print(
                f"  {'':7}  (b) at half its drain rate: {b['lock_waits_share']:.0%} of its"
                " database sessions seen running a statement were waiting on a lock"
            )
        split = row["batch_cpu_us_per_event"]
        if split["total"] is not None:
            print(
                f"  {'':7}  batch mode's CPU per event: workers {split['workers']:.0f} µs,"
                f" PostgreSQL {split['database']:.0f} µs, Redis {split['redis']:.0f} µs;"
                f" {m['nproc']} cores / {split['total']:.0f} µs ="
                f" {m['nproc'] / split['total'] * 1e6:.0f} events/s at most"
            )
    scaling = summary["scaling"]
    for system, name in names.items():
        if system not in scaling:
            continue
        steps = ", ".join(f"{n}: {x:.2f}x" for n, x in scaling[system].items())
        print(f"  scaling {name.split(',')[0]}: {steps}")
    print(
        "  latency: due to work started (a) / committed (b), at a steady load of half each"
        " one's own drain rate; (c): one transaction. RSS: largest single process."
    )
    print(
        f"  batch mode: {o['batch_events']} events per drain, {o['batch_size']} per message;"
        " its latency runs from each event's due time, batching wait included"
    )
    if all("orderonce_prefork" in summary[str(n)] for n in o["workers"]):
        print("\nper message, by workers, one event per transaction:")
        for n in o["workers"]:
            row = summary[str(n)]
            b = row["orderonce_prefork"]
            print(
                f"  {n}: every {1000 * n / row['plain_celery']['events_per_s']:.2f} ms per"
                f" process for (a), {1000 * n / b['events_per_s']:.2f} ms for (b''): its task"
                f" {b['task_mean_ms']:.2f} ms, the protocol in it {b['protocol_mean_ms']:.2f} ms;"
                f" Redis commands (a) {row['redis_commands_per_event']['plain_celery']:.1f},"
                f" (b) {row['redis_commands_per_event']['orderonce']:.1f},"
                f" (b'') {b['redis_commands_per_event']:.1f}"
            )
    alone = results["protocol_alone"]
    print(
        f"\nwhere the time goes: orderonce's protocol alone (protocol.process, no Celery, one"
        f" thread): {alone['events_per_s']:.0f} events/s"
    )
    print(f"  {'':38}{'events':>7}{'mean ms':>9}{'CPU ms':>8}{'PG trips':>10}{'Redis cmds':>12}")
    for kind, k in [*alone["by_kind"].items(), ("all", alone["all"])]:
        print(
            f"  {kind:38}{k['events']:7d}{k['mean_ms']:9.2f}{k['cpu_mean_ms']:8.2f}"
            f"{k['postgres_round_trips']:10.1f}{k['redis_commands']:12.1f}"
        )
    print("  CPU: this process's own; the rest of the time is waiting for PostgreSQL and Redis.")
    batch = results["batch_protocol_alone"]
    server = batch["server_cpu_us_per_event"]
    print(
        f"  batch protocol alone (protocol.process_batch, {o['batch_size']} per batch,"
        f" one thread): {batch['events_per_s']:.0f} events/s, CPU per event"
        f" {batch['cpu_us_per_event']:.0f} µs here"
        + (f" and {server:.0f} µs in PostgreSQL" if server is not None else "")
        + f", {batch['statements_per_batch']:.1f} statements per batch"
    )
    if text := _batch_cost(results):
        print(" ", text.strip())


# --- the stamped table of docs/performance.md -------------------------------------------------

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"


def stamp() -> dict[str, Any]:
    """The commit the benchmark ran at (``+dirty`` when the tree had changes), and when."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "commit": commit + ("+dirty" if dirty else ""),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def results_path(name: str, stamped: dict[str, Any]) -> Path:
    """Where a run's raw results go: ``bench/results/NAME-DATE-COMMIT.json``."""
    day = stamped["measured_at"][:10]
    return RESULTS_DIR / f"{name}-{day}-{stamped['commit']}.json"


def newest(name: str = "throughput") -> Path:
    found = sorted(RESULTS_DIR.glob(f"{name}-*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no {name} results in {RESULTS_DIR}: run `make bench`")
    return max(found, key=lambda p: json.loads(p.read_text())["stamp"]["measured_at"])


def _n(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _machine_speed(results: dict[str, Any]) -> str:
    """The machine's speed in this run, by which runs compare: the same VM type has run the
    same code at half the speed in another run."""
    alone = results.get("batch_protocol_alone")
    if not alone:
        return ""
    return (
        f" This machine's speed in the run: the batch protocol alone (one thread, no Celery) used"
        f" {alone['cpu_us_per_event']:.0f} µs of CPU per event, and PostgreSQL"
        f" {alone['server_cpu_us_per_event']:.0f} µs." + _batch_cost(results)
    )


def _batch_cost(results: dict[str, Any]) -> str:
    """A batch's fixed cost beside its cost per event, where the run measured it (PostgreSQL's
    part where its processes could be read from here)."""
    cost = results.get("batch_cost")
    if not cost or not cost["protocol"]:
        return ""
    sizes = " and ".join(str(n) for n in sorted({m["batch_size"] for m in cost["measured"]}))
    p, db = cost["protocol"], cost["server"]
    server = (
        f", and PostgreSQL {db['fixed_ms']:.1f} ms plus {db['per_event_us']:.0f} µs" if db else ""
    )
    return (
        f" One batch of it cost a fixed {p['fixed_ms']:.1f} ms of CPU plus {p['per_event_us']:.0f}"
        f" µs per event{server} (the same {cost['events']:,} events in batches of {sizes})."
    )


def markdown_table(results: dict[str, Any]) -> str:
    """The results table of docs/performance.md, rendered from one run's JSON."""
    m, o, s, st = results["machine"], results["options"], results["summary"], results["stamp"]
    lines = [
        f"`make bench` at {st['commit']}, {st['measured_at'][:10]}; {m['nproc']} cores"
        f" ({m['cpu']}), Python {m['python']}, Celery {m['celery']}, PostgreSQL"
        f" {m['postgres']['server_version'].split()[0]} (fsync {m['postgres']['fsync']}),"
        f" Redis {m['redis_server']}, {m['servers']} servers. Medians of {o['runs']} runs;"
        f" events/s drain a pre-filled queue; p99 from due time to commit at half the drain"
        f" rate; RSS: the largest single process. Raw results: `bench/results/{results['file']}`."
        + _machine_speed(results),
        "",
        "| workers | (a) Celery no-op, prefork | (a') Celery no-op, N solo"
        " | (b) `orderonce worker` | (b') batch | (b'') `--pool prefork` | (c) DB commits/s"
        " | (c') batch's DB ceiling | b/a | b/a' | b'/a | b''/a | b'/c' | p99 b / b' / b'' ms"
        " | b at 10 events/s: p50 ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in o["workers"]:
        row = s[str(n)]
        prefork = row.get("orderonce_prefork")
        rss = max(
            row[k]["max_rss_mib"]
            for k in ("orderonce", "orderonce_batch", "orderonce_prefork")
            if k in row
        )
        p99 = " / ".join(
            _n(x)
            for x in (
                row["orderonce"]["p99_ms"],
                row["orderonce_batch"]["p99_ms"],
                prefork["p99_ms"] if prefork else None,
            )
        )
        lines.append(
            f"| {n} | {_n(row['plain_celery']['events_per_s'])}"
            f" | {_n(row['plain_celery_solo']['events_per_s'])}"
            f" | {_n(row['orderonce']['events_per_s'])}"
            f" | {_n(row['orderonce_batch']['events_per_s'])}"
            f" | {_n(prefork['events_per_s'] if prefork else None)}"
            f" | {_n(row['db_ceiling']['commits_per_s'])}"
            f" | {_n(row['batch_db_ceiling']['events_per_s'])}"
            f" | {row['b_over_a']:.2f} | {row['b_over_a_solo']:.2f} | {row['batch_over_a']:.2f}"
            f" | {row.get('prefork_over_a', float('nan')):.2f}"
            f" | {row['batch_over_batch_c']:.2f} | {p99}"
            f" | {row['orderonce']['trickle_p50_ms']:.1f} | {rss:.0f} |"
        )
    return "\n".join(lines) + "\n" + _paced_cpu(results)


def _paced_cpu(results: dict[str, Any]) -> str:
    """How busy the host was while (b)'s p99 was measured, where the run measured it."""
    m, o, s = results["machine"], results["options"], results["summary"]
    rows = [(n, s[str(n)]["orderonce"].get("paced_cpu")) for n in o["workers"]]
    if not all(p and p["total"] is not None for _, p in rows):
        return ""
    waits = [s[str(n)]["orderonce"].get("lock_waits_share") for n in o["workers"]]
    with_waits = all(w is not None for w in waits)
    measured = (
        "CPU per event in µs by process, and the share of its busy database sessions waiting"
        " on a lock."
        if with_waits
        else "and CPU per event in µs by process."
    )
    lines = [
        "",
        f"(b) while its p99 was measured, at half its drain rate: cores busy (of {m['nproc']}),"
        f" {measured}",
        "",
        "| workers | cores busy | workers' processes | PostgreSQL | Redis | this benchmark |"
        + (" waiting on a lock |" if with_waits else ""),
        "|---|---|---|---|---|---|" + ("---|" if with_waits else ""),
    ]
    for (n, p), w in zip(rows, waits, strict=True):
        assert p is not None
        lines.append(
            f"| {n} | {p['cores_busy']:.2f} | {p['workers']:.0f} | {p['database']:.0f}"
            f" | {p['redis']:.0f} | {p['benchmark']:.0f} |" + (f" {w:.0%} |" if with_waits else "")
        )
    return "\n".join(lines) + "\n"


def markdown_ingest(results: dict[str, Any]) -> str:
    """The front door's table of docs/performance.md, rendered from one run's JSON."""
    m, o, s, st = results["machine"], results["options"], results["summary"], results["stamp"]
    lines = [
        f"`make bench` (bench.ingest) at {st['commit']}, {st['measured_at'][:10]}; {m['nproc']}"
        f" cores, PostgreSQL {m['postgres']['server_version'].split()[0]} (fsync"
        f" {m['postgres']['fsync']}), {m['servers']} servers; wrk with {o['connections']}"
        f" keep-alive connections, {o['seconds']:g} s per mode, medians of {o['runs']} runs."
        f" Durable: every event wrk saw answered 202 was in the outbox afterwards:"
        f" {'yes' if s['durable'] else 'NO'}. Raw results: `bench/results/{results['file']}`.",
        "",
        "| way in | events/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
        f"| HTTP, one event per POST | {_n(s['single']['events_per_s'])}"
        f" | {s['single']['p50_ms']:.1f} | {s['single']['p99_ms']:.1f} |",
        f"| HTTP, batches of 100 | {_n(s['batch_100']['events_per_s'])}"
        f" | {s['batch_100']['p50_ms']:.1f} | {s['batch_100']['p99_ms']:.1f} |",
        f"| Python Publisher straight to the broker (one thread, not durable before the send)"
        f" | {_n(s['publisher_to_broker']['events_per_s'])} | n/a | n/a |",
    ]
    return "\n".join(lines) + "\n"


def markdown_duplicates(results: dict[str, Any]) -> str:
    """What catching a double order costs (bench.duplicate_check), rendered from one run's
    JSON: the checks alone, then ``order.created`` end to end with and without them."""
    st = results["stamp"]
    lines = [
        f"`make bench` (bench.duplicate_check) at {st['commit']}, {st['measured_at'][:10]}; one"
        f" thread, {results['events']:,} per measurement, on a database holding"
        f" {results['preloaded_orders']:,} orders. Raw results: `bench/results/{results['file']}`.",
        "",
        "| measured | median ms | p99 ms |",
        "|---|---|---|",
    ]
    for part in ("checks_alone", "end_to_end"):
        for name, m in results[part].items():
            lines.append(f"| {name} | {m['median_us'] / 1000:.2f} | {m['p99_us'] / 1000:.2f} |")
    return "\n".join(lines) + "\n"


# Each generated block of docs/performance.md: its marker, the results it shows, the renderer.
BLOCKS = {
    "results": ("throughput", markdown_table),
    "ingest": ("ingest", markdown_ingest),
    "duplicates": ("duplicate_check", markdown_duplicates),
}


def _markers(block: str) -> tuple[str, str]:
    return f"<!-- {block}:begin -->", f"<!-- {block}:end -->"


def doc_table(block: str = "results", doc: Path = DOC) -> str:
    """The table between a block's markers in docs/performance.md."""
    begin, end = _markers(block)
    text = doc.read_text(encoding="utf-8")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n") + "\n"


def rendered(block: str) -> str:
    """A block's table as the newest results render it."""
    name, render = BLOCKS[block]
    path = newest(name)
    return render(json.loads(path.read_text()) | {"file": path.name})


def write_doc_tables(doc: Path = DOC) -> None:
    text = doc.read_text(encoding="utf-8")
    for block in BLOCKS:
        begin, end = _markers(block)
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = f"{head}{begin}\n{rendered(block)}{end}{tail}"
    doc.write_text(text, encoding="utf-8")


def main() -> None:
    """``python -m bench.report [--write]``: the tables of the newest results, printed, or
    written into docs/performance.md."""
    if "--write" in sys.argv[1:]:
        write_doc_tables()
        print("docs/performance.md: tables from the newest results in bench/results/")
        return
    for block in BLOCKS:
        print(rendered(block))


if __name__ == "__main__":
    main()
