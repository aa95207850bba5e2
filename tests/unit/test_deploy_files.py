"""The deployment files agree with the code: compose.yaml, the Dockerfile, Prometheus, Grafana.

No container engine here, so nothing is started: each test reads a file the way its tool would
and checks it against what the code really offers (tests/deploy_files.py).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from schemas import CLOUD_EVENT
from tests.deploy_files import (
    INTERPOLATION,
    ROOT,
    CliRefused,
    compose,
    defined_metrics,
    dockerfile_instructions,
    environment,
    exec_form,
    load_yaml,
    panels,
    parse_cli,
    promql_names,
    setting_env_names,
)

ORDERONCE_IMAGE = "orderonce:local"
# What each orderonce service must run (the first words of its command).
EXPECTED_COMMANDS = {
    "migrate": ("db", "upgrade"),
    "worker": ("worker",),
    "relay": ("relay",),
    "producer": ("publish",),
}
REQUIRED_SERVICES = {"postgres", "redis", "rabbitmq", "prometheus", "grafana", *EXPECTED_COMMANDS}


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def _orderonce_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if s.get("image") == ORDERONCE_IMAGE}


def _mount(service: dict[str, Any], host_path: str) -> PurePosixPath:
    """Where a bind mount of ``host_path`` (relative to the repository) lands in the container."""
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if Path(ROOT, source).resolve() == Path(ROOT, host_path).resolve():
            return PurePosixPath(target)
    raise AssertionError(f"{host_path} is not mounted: {service.get('volumes')}")


def _worker_metrics_port(services: dict[str, dict[str, Any]]) -> int:
    port = parse_cli(services["worker"]["command"]).params["metrics_port"]
    assert isinstance(port, int)
    return port


# --- services and commands --------------------------------------------------------------------


def test_the_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED_SERVICES, REQUIRED_SERVICES - set(services)
    assert "rabbitmq" in services["rabbitmq"].get("profiles", [])
    # Everything ops needs by default starts without a profile.
    for name in REQUIRED_SERVICES - {"rabbitmq"}:
        assert not services[name].get("profiles"), name


def test_orderonce_services_run_the_image_the_dockerfile_builds(
    services: dict[str, dict[str, Any]],
) -> None:
    ours = _orderonce_services(services)
    assert set(EXPECTED_COMMANDS) <= set(ours)
    for name, service in ours.items():
        assert service.get("build") in (".", {"context": "."}), name


def test_every_orderonce_command_is_a_real_cli_command(
    services: dict[str, dict[str, Any]],
) -> None:
    # The image's ENTRYPOINT is `orderonce`, so `command` is its arguments; parsing them with
    # the real CLI also refuses unknown options and bad values.
    for name, service in _orderonce_services(services).items():
        try:
            invocation = parse_cli(service["command"])
        except CliRefused as exc:
            pytest.fail(f"service {name}: `orderonce {' '.join(service['command'])}`: {exc}")
        if name in EXPECTED_COMMANDS:
            assert invocation.path == EXPECTED_COMMANDS[name], name


def test_healthchecks_that_run_orderonce_use_real_commands(
    services: dict[str, dict[str, Any]],
) -> None:
    checked = 0
    for name, service in services.items():
        test = (service.get("healthcheck") or {}).get("test", [])
        if isinstance(test, list) and len(test) > 1 and test[0] == "CMD" and test[1] == "orderonce":
            try:
                parse_cli(test[2:])
            except CliRefused as exc:
                pytest.fail(f"service {name} healthcheck: {exc}")
            checked += 1
    assert checked >= 1, "the worker should have a readiness check (orderonce health)"


def test_the_parser_refuses_what_the_cli_refuses() -> None:
    # The checks above are only as good as this parser: it must say no where the CLI does.
    assert parse_cli(["worker", "--metrics-port", "9108"]).params["metrics_port"] == 9108
    assert parse_cli(["db", "upgrade"]).path == ("db", "upgrade")
    for bad in (
        ["no-such-command"],
        ["db", "downgrade"],
        ["db"],
        ["worker", "--no-such-option"],
        ["worker", "--metrics-port", "70000"],
        ["prune"],  # --older-than is required
    ):
        with pytest.raises(CliRefused):
            parse_cli(bad)


# --- environment and secrets ----------------------------------------------------------------


def test_every_orderonce_variable_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    known = setting_env_names()
    used = {
        name
        for service in services.values()
        for name in environment(service)
        if name.startswith("ORDERONCE_")
    }
    # Also the host variables the file interpolates: an ORDERONCE_ name there is a setting too.
    used |= {
        n
        for n in INTERPOLATION.findall(ROOT.joinpath("compose.yaml").read_text())
        if n.startswith("ORDERONCE_")
    }
    assert used, "compose.yaml configures orderonce through ORDERONCE_* variables"
    assert used <= known, f"not read by orderonce.config.Settings: {sorted(used - known)}"


def test_urls_name_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    env = environment(services["worker"])
    assert "@postgres:5432/" in str(env["ORDERONCE_DATABASE_URL"])
    assert "redis://redis:6379/" in str(env["ORDERONCE_REDIS_URL"])
    # Every orderonce process shares one configuration (one queue, one set of timings).
    for name, service in _orderonce_services(services).items():
        assert environment(service) == env, name


def _is_secret(key: str) -> bool:
    return any(word in key.upper() for word in ("PASSWORD", "_PASS", "SECRET", "KEY"))


def test_no_secret_is_written_into_the_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for key, value in environment(service).items():
            if value is None:
                continue  # passed through from the shell
            if _is_secret(key):
                # Only a local-development default behind an interpolation.
                assert value.startswith("${") and ":-" in value, f"{name}: {key}={value}"
            if "://" in value and "@" in value:
                credentials = value.split("://", 1)[1].split("@", 1)[0]
                password = credentials.partition(":")[2]
                assert not password or password.startswith("${"), f"{name}: {key}"


# --- scaling and start order -----------------------------------------------------------------


def test_workers_can_be_scaled(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    # A fixed container name or host port would make the second replica fail to start.
    assert "container_name" not in worker
    assert not worker.get("ports"), "no host ports on workers: Prometheus scrapes them inside"
    assert "hostname" not in worker
    # Each replica is its own Celery node: the name carries the container's hostname.
    name = parse_cli(worker["command"]).params.get("name")
    assert name is None or "%h" in name


def _condition(service: dict[str, Any], dependency: str) -> str | None:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return "service_started" if dependency in depends else None
    entry = depends.get(dependency)
    return None if entry is None else str(entry.get("condition", "service_started"))


def test_the_migration_runs_once_before_anything_uses_the_schema(
    services: dict[str, dict[str, Any]],
) -> None:
    assert _condition(services["migrate"], "postgres") == "service_healthy"
    assert services["migrate"].get("restart", "no") == "no"
    for name in ("worker", "relay", "producer"):
        assert _condition(services[name], "migrate") == "service_completed_successfully", name
        assert _condition(services[name], "redis") == "service_healthy", name
    for name in ("postgres", "redis", "rabbitmq"):
        assert services[name].get("healthcheck", {}).get("test"), name


def test_workers_shut_down_warm(services: dict[str, dict[str, Any]]) -> None:
    from orderonce.config import Settings

    worker = services["worker"]
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    grace = str(worker["stop_grace_period"])
    assert grace.endswith("s")
    # Longer than a delivery may take, so the runtime's SIGKILL never cuts a warm shutdown.
    assert float(grace[:-1]) > Settings().task_time_limit_s


def test_the_sample_producer_publishes_valid_events_with_duplicates(
    services: dict[str, dict[str, Any]],
) -> None:
    producer = services["producer"]
    file = PurePosixPath(parse_cli(producer["command"]).params["file"])
    host_dir = "deploy/samples"
    assert file.parent == _mount(producer, host_dir)
    lines = ROOT.joinpath(host_dir, file.name).read_text(encoding="utf-8").splitlines()
    keys = Counter()
    for line in lines:
        event = CLOUD_EVENT.validate_json(line)
        keys[(event.source, event.id)] += 1
    assert len(keys) >= 50
    assert any(n > 1 for n in keys.values()), "the sample should show duplicates being caught"


# --- Dockerfile --------------------------------------------------------------------------------


def test_the_dockerfile_runs_a_real_command_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    named = dict(instructions)  # the last one of each kind wins, as in Docker
    assert exec_form(named["ENTRYPOINT"]) == ["orderonce"]
    parse_cli(exec_form(named["CMD"]))
    user = named["USER"]
    assert user not in ("root", "0"), user
    order = [i for i, _ in instructions]
    assert order.index("USER") < order.index("ENTRYPOINT")
    for instruction, arguments in instructions:
        if instruction == "RUN" and "pip install" in arguments:
            assert "[dev]" not in arguments, "no development dependencies in the image"
        if instruction == "COPY":
            for source in arguments.split()[:-1]:
                assert ROOT.joinpath(source).exists(), source


# --- Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    config_path = _mount(prometheus, "deploy/prometheus.yml")
    assert f"--config.file={config_path}" in prometheus.get("command", [])
    config = load_yaml(ROOT / "deploy" / "prometheus.yml")
    port = _worker_metrics_port(services)
    assert port > 0, "workers must serve metrics"
    assert str(port) in [str(p) for p in services["worker"].get("expose", [])]
    found = []
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            # Every replica of the scaled service, by the A records Docker's DNS returns.
            if "worker" in sd["names"] and sd.get("type", "SRV") == "A":
                found.append(sd["port"])
        for static in job.get("static_configs", []):
            found += [int(t.rsplit(":", 1)[1]) for t in static["targets"] if "worker" in t]
    assert found and set(found) == {port}, f"scraped ports {found}, workers serve {port}"


# --- Grafana -----------------------------------------------------------------------------------

GRAFANA = ROOT / "deploy" / "grafana"


def _dashboard() -> dict[str, Any]:
    loaded = json.loads((GRAFANA / "dashboards" / "orderonce.json").read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard(
    services: dict[str, dict[str, Any]],
) -> None:
    grafana = services["grafana"]
    assert _mount(grafana, "deploy/grafana/provisioning") == PurePosixPath(
        "/etc/grafana/provisioning"
    )
    dashboards_dir = _mount(grafana, "deploy/grafana/dashboards")
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (prometheus,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "orderonce.yml")
    assert str(dashboards_dir) in [p["options"]["path"] for p in providers["providers"]]
    # The dashboard points at the provisioned datasource by its uid.
    uids = {
        p["datasource"]["uid"]
        for p in [*panels(_dashboard()), *(t for p in panels(_dashboard()) for t in p["targets"])]
    }
    assert uids == {prometheus["uid"]}


def test_the_dashboard_queries_only_metrics_the_worker_defines() -> None:
    metrics = defined_metrics()
    assert "orderonce_events" in metrics and metrics["orderonce_events"].labels
    series = set().union(*(m.series() for m in metrics.values()))
    labels = {label for m in metrics.values() for label in m.labels} | {"le", "instance", "job"}
    dashboard = _dashboard()
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    used: set[str] = set()
    for panel in panels(dashboard):
        if panel.get("type") == "row":
            continue
        assert panel.get("targets"), panel["title"]
        for target in panel["targets"]:
            names = promql_names(target["expr"])
            assert names.metrics, f"{panel['title']}: no metric in {target['expr']}"
            assert names.metrics <= series, f"{panel['title']}: {names.metrics - series}"
            assert names.labels <= labels, f"{panel['title']}: {names.labels - labels}"
            used |= names.metrics
    # The list: throughput, duplicates by cause, dead letters, lag, lock contention.
    for needed in (
        "orderonce_events_total",
        "orderonce_dead_letters_total",
        "orderonce_dead_letter_backlog",
        "orderonce_lag_seconds_bucket",
        "orderonce_lock_contention_total",
    ):
        assert needed in used, needed
    by_cause = [t["expr"] for p in panels(dashboard) for t in p["targets"] if "cause" in t["expr"]]
    assert by_cause, "a panel must break duplicates down by cause"


def test_the_query_reader_finds_unknown_names() -> None:
    names = promql_names(
        'histogram_quantile(0.99, sum by (le) (rate(orderonce_lag_seconds_bucket{type!="x"}'
        "[$__rate_interval]))) / ignoring(job) orderonce_nope"
    )
    assert names.metrics == {"orderonce_lag_seconds_bucket", "orderonce_nope"}
    assert names.labels == {"le", "type", "job"}
