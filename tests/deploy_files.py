"""What the deployment files say, read the way their tools read them, and what the code offers.

No container engine runs on the development machines, so tests/unit/test_deploy_files.py
compares the two instead: the compose file's commands against the real CLI (typer's click
tree), its environment against the settings' fields, the dashboard's queries against the
metrics the worker defines.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import typer
import yaml

from orderonce.cli import app
from orderonce.config import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
METRICS_MODULE = ROOT / "worker" / "ops" / "metrics.py"


def load_yaml(path: Path) -> Any:
    # safe_load understands the `<<: *anchor` merge keys compose files use.
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    loaded = load_yaml(COMPOSE)
    assert isinstance(loaded, dict)
    return loaded


# --- the CLI ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invocation:
    path: tuple[str, ...]  # ("db", "upgrade")
    params: dict[str, Any]  # as the command would receive them, converted and checked


class CliRefused(Exception):
    """The real command line would refuse these arguments (its own message says why)."""


# Typer >= 0.2x parses with its own copy of click, whose errors are TyperExceptions; older
# Typer used click itself. Either way, these are "the CLI says no".
try:
    from typer.exceptions import TyperException as _TyperError
except ImportError:  # pragma: no cover - older typer
    _TyperError = click.ClickException  # type: ignore[assignment,misc]
_REFUSALS = (click.ClickException, _TyperError)


def _is_group(command: Any) -> bool:
    # Duck-typed: the vendored click's group is not a click.Group.
    return hasattr(command, "list_commands") and hasattr(command, "get_command")


def parse_cli(args: Sequence[str]) -> Invocation:
    """Parse ``orderonce ARGS`` exactly as the CLI would (typer's click tree, built from
    orderonce.cli.app), without running anything.

    Raises CliRefused (unknown command, unknown option, bad value, missing argument) where
    the real command line would refuse the same arguments."""
    command: Any = typer.main.get_command(app)
    rest, path = list(args), []
    ctx = command.context_class(command, info_name="orderonce")
    try:
        while _is_group(command):
            if rest == ["--help"]:  # every group and command has it
                return Invocation(tuple(path), {})
            if not rest or rest[0].startswith("-"):
                raise CliRefused(f"no subcommand after {' '.join(['orderonce', *path])}")
            sub = command.get_command(ctx, rest[0])
            if sub is None:
                raise CliRefused(f"no such command: {' '.join(['orderonce', *path, rest[0]])}")
            path.append(rest.pop(0))
            command = sub
            if _is_group(command):
                ctx = command.context_class(command, info_name=path[-1], parent=ctx)
        if rest == ["--help"]:
            return Invocation(tuple(path), {})
        parsed = command.make_context(path[-1], rest, parent=ctx)
    except _REFUSALS as exc:
        raise CliRefused(f"orderonce {' '.join(args)}: {exc}") from exc
    return Invocation(tuple(path), dict(parsed.params))


# --- settings -------------------------------------------------------------------------------


def setting_env_names() -> set[str]:
    """The environment names orderonce.config.Settings reads."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


def environment(service: dict[str, Any]) -> dict[str, str | None]:
    """A service's environment as a mapping, from either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) if "=" in item else (item, None) for item in env)
        return {k: v for k, v in pairs}
    return {str(k): None if v is None else str(v) for k, v in env.items()}


INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


# --- the Dockerfile -------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result = []
    for text in logical:
        instruction, _, arguments = text.partition(" ")
        result.append((instruction.upper(), arguments.strip()))
    return result


def exec_form(arguments: str) -> list[str]:
    """An ENTRYPOINT/CMD in exec (JSON array) form; the shell form would hide signals from
    Celery behind /bin/sh, so it is refused."""
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return value


# --- metrics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # counter, histogram, gauge
    labels: tuple[str, ...]

    def series(self) -> set[str]:
        """The names Prometheus stores for it (prometheus-client's exposition, multiprocess
        mode: no _created series)."""
        if self.kind == "counter":
            return {f"{self.name.removesuffix('_total')}_total"}
        if self.kind == "histogram":
            return {f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        return {self.name}


_KINDS = {
    "Counter": "counter",
    "Histogram": "histogram",
    "Gauge": "gauge",
    "GaugeMetricFamily": "gauge",
    "CounterMetricFamily": "counter",
}


def defined_metrics(path: Path = METRICS_MODULE) -> dict[str, MetricDef]:
    """Every metric worker/ops/metrics.py creates, read from its source: the constructor calls of
    prometheus-client classes, with names given as literals or module constants."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }

    def string(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            return constants.get(node.id)
        return None

    found: dict[str, MetricDef] = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        kind = _KINDS.get(node.func.id)
        if kind is None or not node.args or (name := string(node.args[0])) is None:
            continue
        label_node = node.args[2] if len(node.args) > 2 else None
        for kw in node.keywords:
            if kw.arg in ("labelnames", "labels"):
                label_node = kw.value
        labels: tuple[str, ...] = ()
        if isinstance(label_node, ast.List | ast.Tuple):
            labels = tuple(s for e in label_node.elts if (s := string(e)) is not None)
        found[name] = MetricDef(name, kind, labels)
    return found


# --- PromQL, just enough to name what a query reads --------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_SELECTOR = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


@dataclass(frozen=True)
class QueryNames:
    metrics: set[str]
    labels: set[str]


def promql_names(expr: str) -> QueryNames:
    """The series names and label names a PromQL expression uses."""
    labels: set[str] = set()
    # Label matchers first (their values are strings), then drop strings, ranges, groupings.
    for selector in _SELECTOR.findall(expr):
        labels |= set(_MATCHER.findall(_STRINGS.sub('""', selector)))
    text = _SELECTOR.sub(" ", _STRINGS.sub('""', expr))
    text = _RANGE.sub(" ", text)
    for _, grouped in _GROUPING.findall(text):
        labels |= {g.strip() for g in grouped.split(",") if g.strip()}
    text = _GROUPING.sub(" ", text)
    metrics = {
        name
        for name, call in _IDENT.findall(text)
        if not call and name.lower() not in _KEYWORDS  # a name followed by "(" is a function
    }
    return QueryNames(metrics, labels)


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])
