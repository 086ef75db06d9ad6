"""docker-compose.yml, the Dockerfile, .dockerignore and the monitoring files, checked against the
package.

No Docker engine is needed: the files are parsed and every name in them that the package defines
(the console script, the ``worker``, ``beat``, ``exporter`` and ``health`` subcommands and their
options, Celery's options, the environment variables, the fake Metrix's options, the paths the
image copies, the metric names) is looked up in the package itself, so a rename on either side
fails here. The Prometheus configuration, the alert rules, the Grafana provisioning and dashboard
and docs/operations.md are checked against docker-compose.yml and against the metrics
``metrix_s2s.metrics`` exports. When ``docker compose`` is available, ``docker compose config``
validates the file as well.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml
from celery.bin.beat import beat as celery_beat
from celery.bin.worker import worker as celery_worker
from fake_metrix import _parser as fake_metrix_parser
from packaging.specifiers import SpecifierSet
from prometheus_client.metrics import MetricWrapperBase

import metrix_s2s.cli
from metrix_s2s import metrics
from metrix_s2s.cli import cli
from metrix_s2s.settings import DEFAULT_BASE_URL, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

SERVICES = ("redis", "worker", "beat", "flower", "exporter", "fake-metrix", "prometheus", "grafana")
#: The services that run a ``metrix-s2s`` subcommand of the same name, and the Celery command
#: that subcommand execs (the options after ``--`` are that command's).
PROCESSES = {"worker": celery_worker, "beat": celery_beat}
#: The services that run the image and read the package's settings from x-metrix-environment.
METRIX_SERVICES = ("worker", "beat", "exporter")
#: Variables only the worker service sets on top of x-metrix-environment.
WORKER_ONLY = {"METRIX_METRICS_PORT"}
#: The services of ``--profile monitoring``.
MONITORING = ("prometheus", "grafana")
#: What the host's environment (or .env) provides: the variables the file requires.
HOST_ENV = {
    "METRIX_APPS": '{"app-1": "dev-key-1", "app-2": {"dev_key": "dev-key-2", "rate_limit": "5/s"}}',
    "FLOWER_BASIC_AUTH": "admin:secret",
}
#: Paths the image needs: the build's inputs, and the fake Metrix that fake-metrix runs.
IMAGE_NEEDS = ("pyproject.toml", "README.md", "metrix_s2s", "scripts/fake_metrix.py")

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_]\w*)")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


# ---------------------------------------------------------------------------------------------
# Reading the files
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "docker-compose.yml has no services"
    return found


def argv(service: Mapping[str, Any]) -> list[str]:
    """A service's command as a list of arguments (exec form, or a string split like a shell)."""
    command = service.get("command")
    assert command, "the service has no command"
    if isinstance(command, str):
        return shlex.split(command)
    return [str(part) for part in command]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as written (``KEY: value`` or ``- KEY=value``)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def interpolate(value: str, host: Mapping[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` against ``host``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        current = host.get(name)
        if operator in {":-", "-"} and (current is None or (operator == ":-" and not current)):
            return argument or ""
        if operator in {":?", "?"} and (current is None or (operator == ":?" and not current)):
            raise LookupError(f"{name}: {argument}")
        return current or ""

    return _VARIABLE.sub(replace, value)


def resolved_environment(service: Mapping[str, Any], host: Mapping[str, str]) -> dict[str, str]:
    return {key: interpolate(value, host) for key, value in environment(service).items()}


def seconds(duration: str | int | float) -> float:
    """A compose duration (``60s``, ``1m30s``) in seconds."""
    if isinstance(duration, int | float):
        return float(duration)
    parts = _DURATION.findall(duration)
    assert parts, f"{duration!r} is not a duration"
    assert "".join(number + unit for number, unit in parts) == duration.replace(" ", "")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def replicas(service: Mapping[str, Any]) -> int:
    deploy = service.get("deploy") or {}
    return int(deploy.get("replicas", service.get("scale", 1)))


def option_names(command: click.Command) -> set[str]:
    names: set[str] = set()
    for param in command.params:
        if isinstance(param, click.Option):
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def unknown_options(args: list[str], command: click.Command) -> list[str]:
    """The options in ``args`` that ``command`` does not define."""
    known = option_names(command)
    return [arg for arg in args if arg.startswith("-") and arg.split("=", 1)[0] not in known]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps ``path`` (or a directory above it) out of the build context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        bare = pattern.lstrip("!").removeprefix("/")
        pattern_variants = {bare, bare.removeprefix("**/")}
        if any(fnmatch.fnmatch(prefix, p) for prefix in prefixes for p in pattern_variants):
            result = not negated
    return result


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------


def test_the_topology_has_every_service(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in SERVICES if name not in services]
    assert not missing, f"docker-compose.yml lacks the services {missing}"


def test_redis_persists_and_never_evicts(services: dict[str, dict[str, Any]]) -> None:
    redis_service = services["redis"]
    args = argv(redis_service)
    assert args[0] == "redis-server"
    options = dict(zip(args[1::2], args[2::2], strict=False))
    assert options.get("--appendonly") == "yes", "Redis must persist to its append-only file"
    assert options.get("--maxmemory-policy") == "noeviction", (
        "Redis must never evict: it holds the queue and the dead letters"
    )
    assert any(str(volume).endswith(":/data") for volume in redis_service.get("volumes", [])), (
        "the append-only file must live on a volume at /data"
    )
    test = redis_service.get("healthcheck", {}).get("test", [])
    check = test if isinstance(test, str) else " ".join(test)
    assert "redis-cli ping" in check


def test_the_console_script_is_declared() -> None:
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts.get("metrix-s2s") == "metrix_s2s.cli:main"
    module, _, attribute = scripts["metrix-s2s"].partition(":")
    assert module == metrix_s2s.cli.__name__
    assert callable(getattr(metrix_s2s.cli, attribute))


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_processes_run_real_subcommands_with_real_options(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    args = argv(services[name])
    assert args[0] == "metrix-s2s", f"{name} must run the metrix-s2s console script"
    subcommand = args[1]
    assert subcommand == name, f"the {name} service runs 'metrix-s2s {subcommand}'"
    command = cli.commands.get(subcommand)
    assert command is not None, f"metrix-s2s has no {subcommand!r} subcommand"
    rest = args[2:]
    ours, celery_args = (
        (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if ("--" in rest) else (rest, [])
    )
    # The subcommands pass unknown options on to Celery, so a misspelt one would not fail there.
    assert not unknown_options(ours, command), f"not options of 'metrix-s2s {subcommand}'"
    ctx = command.make_context(subcommand, list(ours))  # checks the values: choices, ranges
    assert not ctx.params.get("celery_args"), f"stray arguments before '--': {ours}"
    assert not unknown_options(celery_args, PROCESSES[name]), f"not options of 'celery {name}'"


def test_workers_use_a_threads_pool(services: dict[str, dict[str, Any]]) -> None:
    command = cli.commands["worker"]
    ctx = command.make_context("worker", argv(services["worker"])[2:])
    assert ctx.params["pool"] == "threads", "delivery is I/O bound: the pool must hide latency"
    assert ctx.params["concurrency"] >= 16


def test_workers_scale_and_shut_down_warm(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert replicas(worker) >= 2
    grace = seconds(worker.get("stop_grace_period", "10s"))
    settings = Settings.from_env(resolved_environment(worker, HOST_ENV))
    longest = max(settings.time_limit_s, settings.bulk_time_limit_s)
    assert grace > longest, (
        f"stop_grace_period {grace:g}s does not cover the hard time limit of a delivery or a "
        f"batch ({longest:g}s): docker would kill deliveries under way"
    )


def test_exactly_one_beat(services: dict[str, dict[str, Any]]) -> None:
    assert replicas(services["beat"]) == 1


def test_every_variable_named_is_one_the_package_reads(compose: dict[str, Any]) -> None:
    read = set(re.findall(r"METRIX_[A-Z_]+", (ROOT / "metrix_s2s" / "settings.py").read_text()))
    fake = ROOT / "metrix_s2s" / "testing" / "fake_metrix.py"
    read |= set(re.findall(r"METRIX_[A-Z_]+", fake.read_text()))
    package_source = "\n".join(p.read_text() for p in (ROOT / "metrix_s2s").rglob("*.py"))
    read |= set(re.findall(r"CELERY_[A-Z_]+", package_source))
    assert {"METRIX_APPS", "METRIX_BASE_URL", "CELERY_BROKER_URL"} <= read  # the regexes work
    for path in (COMPOSE_FILE, DOCKERFILE):
        named = set(re.findall(r"(?:METRIX|CELERY)_[A-Z_]+", path.read_text()))
        assert named <= read, f"{path.name} names variables nothing reads: {sorted(named - read)}"


def test_workers_and_beat_share_one_valid_configuration(
    services: dict[str, dict[str, Any]],
) -> None:
    worker_env = environment(services["worker"])
    shared = {key: value for key, value in worker_env.items() if key not in WORKER_ONLY}
    assert set(worker_env) >= WORKER_ONLY, f"the worker service must set {sorted(WORKER_ONLY)}"
    assert environment(services["beat"]) == shared, "worker and beat must see the same settings"
    assert environment(services["exporter"]) == shared, (
        "the exporter must read the workers' Redis, key prefix and apps"
    )
    assert "METRIX_APPS" in worker_env
    with pytest.raises(LookupError, match="METRIX_APPS"):
        resolved_environment(services["worker"], {})  # required, not silently empty
    settings = Settings.from_env(resolved_environment(services["worker"], HOST_ENV))
    assert settings.base_url == DEFAULT_BASE_URL, "production must deliver to the real Metrix"
    assert sorted(settings.apps) == ["app-1", "app-2"]
    fake = "http://fake-metrix:8080"
    local = Settings.from_env(
        resolved_environment(services["worker"], HOST_ENV | {"METRIX_BASE_URL": fake})
    )
    assert local.base_url == fake, "METRIX_BASE_URL must be overridable for the local try"


@pytest.mark.parametrize("name", METRIX_SERVICES)
def test_processes_use_the_redis_service(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    broker = urlsplit(environment(service).get("CELERY_BROKER_URL", ""))
    assert broker.scheme == "redis"
    assert broker.hostname == "redis"
    assert broker.hostname in services
    assert (broker.port or 6379) == 6379
    assert "METRIX_REDIS_URL" not in environment(service), "state follows the broker's Redis"
    depends_on = service.get("depends_on") or {}
    assert isinstance(depends_on, dict)
    assert depends_on.get("redis", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", [*METRIX_SERVICES, "fake-metrix"])
def test_our_services_run_the_image_built_here(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    build = services[name].get("build")
    assert build is not None, f"{name} must be built from the Dockerfile"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_flower_watches_the_same_broker_behind_basic_auth(
    services: dict[str, dict[str, Any]],
) -> None:
    flower = services["flower"]
    args = argv(flower)
    assert "flower" in args
    brokers = [arg.split("=", 1)[1] for arg in args if arg.startswith("--broker=")]
    assert brokers == [environment(services["worker"])["CELERY_BROKER_URL"]]
    auth = environment(flower).get("FLOWER_BASIC_AUTH") or next(
        (arg.split("=", 1)[1] for arg in args if arg.startswith("--basic_auth=")), ""
    )
    assert auth, "Flower must have basic auth"
    with pytest.raises(LookupError):
        interpolate(auth, {})  # no credentials, no Flower: never an open dashboard
    assert any(str(port).endswith("5555") for port in flower.get("ports", []))


def test_fake_metrix_runs_only_for_a_local_try(
    services: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    fake = services["fake-metrix"]
    assert fake.get("profiles") == ["local"]
    args = argv(fake)
    assert args[0] in {"python", "python3"}
    assert (ROOT / args[1]).is_file(), f"{args[1]} does not exist"
    assert args[1] == "scripts/fake_metrix.py"
    options = fake_metrix_parser().parse_args(args[2:])
    assert options.host == "0.0.0.0", "the fake must listen beyond the container's loopback"
    assert environment(fake).get("METRIX_APPS") == environment(services["worker"])["METRIX_APPS"]
    # The local try points the workers at the fake's port, as the header says.
    assert f"METRIX_BASE_URL=http://fake-metrix:{options.port}" in COMPOSE_FILE.read_text()
    # Production must not need it.
    for name, service in services.items():
        if "profiles" not in service:
            assert "fake-metrix" not in (service.get("depends_on") or {}), name


def test_the_header_documents_the_environment(services: dict[str, dict[str, Any]]) -> None:
    header = "\n".join(
        line for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")
    )
    variables: set[str] = set()
    for service in services.values():
        for value in environment(service).values():
            variables.update(m.group(1) or m.group(4) for m in _VARIABLE.finditer(value))
        for port in service.get("ports", []):
            variables.update(m.group(1) or m.group(4) for m in _VARIABLE.finditer(str(port)))
    variables.update(environment(services["worker"]))
    undocumented = sorted(name for name in variables if name not in header)
    assert not undocumented, f"the header comment does not document {undocumented}"
    assert "docker compose up -d" in header
    assert "docker compose --profile local up" in header
    assert "docker compose --profile monitoring up" in header


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI on this machine")
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if version.returncode != 0:
        pytest.skip(
            "'docker compose version' fails here (no compose plugin), so docker-compose.yml is "
            "only checked by parsing: "
            + (version.stderr.strip() or version.stdout.strip() or "no output").splitlines()[0]
        )
    # An empty env file: a developer's .env next to the compose file must not decide the outcome.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    compose_cmd = ["docker", "compose", "-f", str(COMPOSE_FILE), "--env-file", str(env_file)]
    for profile in ([], ["--profile", "local"], ["--profile", "monitoring"]):
        result = subprocess.run(
            [*compose_cmd, *profile, "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **HOST_ENV},
        )
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# Monitoring: the exporter, health, Prometheus, Grafana and docs/operations.md
# ---------------------------------------------------------------------------------------------

MONITORING_DIR = ROOT / "monitoring"
PROMETHEUS_DIR = MONITORING_DIR / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
GRAFANA_DIR = MONITORING_DIR / "grafana"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "metrix-s2s.yml"
DASHBOARD = GRAFANA_DIR / "dashboards" / "metrix-s2s.json"
OPERATIONS = ROOT / "docs" / "operations.md"

WORKERS_JOB = "metrix-s2s-workers"
EXPORTER_JOB = "metrix-s2s-exporter"
#: The alerts docs/operations.md explains; each must be in alerts.yml.
REQUIRED_ALERTS = (
    "MetrixS2SDeadLettersGrowing",
    "MetrixS2SOldestPendingOver15m",
    "MetrixS2SNoWorker",
    "MetrixS2SAppPaused",
    "MetrixS2SRedriveNotRunning",
    "MetrixS2SRedisDown",
)
#: The names under which Prometheus stores each kind of metric family.
_SERIES_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}
_METRIC_NAME = re.compile(r"\bmetrix_s2s_[a-z0-9_]*[a-z0-9]")
_PROMETHEUS_DURATION = re.compile(r"(?:\d+(?:ms|s|m|h|d|w|y))+")
_JOB = re.compile(r'\bjob\s*=~?\s*"([^"]*)"')


def exported_metrics() -> dict[str, set[str]]:
    """Every metric family ``metrix_s2s.metrics`` exports, to the series names Prometheus stores
    for it: the module's prometheus-client metrics and the exporter's gauges."""
    families: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                suffixes = _SERIES_SUFFIXES.get(family.type, ("",))
                families[family.name] = {family.name + suffix for suffix in suffixes}
    for name in metrics.EXPORTER_METRICS:
        families[name] = {name}
    return families


def metric_names(text: str) -> set[str]:
    return set(_METRIC_NAME.findall(text))


def balanced(expr: str) -> bool:
    """Whether the brackets of a PromQL expression pair up (outside its strings)."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in re.sub(r'"(?:\\.|[^"\\])*"', '""', expr):
        if char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack and expr.count('"') % 2 == 0


def load_yaml(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(ALERTS)
    assert isinstance(data, dict), "alerts.yml is not a mapping"
    groups = data.get("groups")
    assert isinstance(groups, list), "alerts.yml has no list of groups"
    assert groups, "alerts.yml has no group"
    rules: list[dict[str, Any]] = []
    for group in groups:
        assert isinstance(group, dict), f"a group is not a mapping: {group!r}"
        assert group.get("name"), "a group has no name"
        assert isinstance(group.get("rules"), list), f"group {group.get('name')} has no rules"
        assert group["rules"], f"group {group['name']} is empty"
        rules.extend(group["rules"])
    return rules


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict), "the dashboard is not a JSON object"
    return data


def dashboard_queries(node: Any) -> list[str]:
    """Every PromQL string in the dashboard: the panels' ``expr`` and the variables' queries."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"expr", "query", "definition"} and isinstance(value, str) and value:
                found.append(value)
            else:
                found.extend(dashboard_queries(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(dashboard_queries(item))
    return found


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config.get("scrape_configs") or []}
    assert jobs, "prometheus.yml scrapes nothing"
    return jobs


def host_ports(service: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """A service's published ports as ``(host address, host port, container port)``."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append(
                (str(port.get("host_ip", "")), str(port.get("published", "")), str(port["target"]))
            )
            continue
        parts = str(port).rsplit(":", 2)
        parts = [""] * (3 - len(parts)) + parts
        found.append((parts[0], parts[1], parts[2].split("/")[0]))
    return found


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """A service's volumes as ``(source, target, read-only)``; a named volume's source is its
    name, a bind mount's starts with ``.`` or ``/``."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found.append(
                (str(volume.get("source", "")), volume["target"], bool(volume.get("read_only")))
            )
            continue
        source, target, *mode = str(volume).split(":")
        found.append((source, target, "ro" in ",".join(mode).split(",")))
    return found


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mounted_at(service: Mapping[str, Any], target: str) -> Path:
    """The repository path a service mounts at ``target``."""
    sources = [source for source, at, _ in mounts(service) if at.rstrip("/") == target]
    assert sources, f"nothing is mounted at {target}"
    assert is_bind(sources[0]), f"{target} is not a bind mount of the repository"
    return (ROOT / sources[0]).resolve()


def healthcheck_args(service: Mapping[str, Any]) -> list[str]:
    test = service.get("healthcheck", {}).get("test")
    assert isinstance(test, list), "the healthcheck must be an exec-form list"
    assert test[0] == "CMD", "the healthcheck must run the command itself, not a shell"
    return [str(arg) for arg in test[1:]]


def option_value(args: list[str], option: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_exporter_runs_a_real_subcommand_once(services: dict[str, dict[str, Any]]) -> None:
    exporter = services["exporter"]
    args = argv(exporter)
    assert args[:2] == ["metrix-s2s", "exporter"], "the exporter runs 'metrix-s2s exporter'"
    command = cli.commands.get("exporter")
    assert command is not None, "metrix-s2s has no 'exporter' subcommand"
    assert not unknown_options(args[2:], command), "not options of 'metrix-s2s exporter'"
    command.make_context("exporter", args[2:])  # checks the values: types, ranges
    assert replicas(exporter) == 1, "one exporter per deployment: each reports the same state"
    assert "profiles" not in exporter, "the exporter runs in production, not only with a profile"


@pytest.mark.parametrize("name", ["worker", "beat"])
def test_healthchecks_run_metrix_s2s_health(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    args = healthcheck_args(service)
    assert args[:2] == ["metrix-s2s", "health"], f"{name}'s healthcheck must be 'metrix-s2s health'"
    command = cli.commands.get("health")
    assert command is not None, "metrix-s2s has no 'health' subcommand"
    assert not unknown_options(args[2:], command), "not options of 'metrix-s2s health'"
    params = command.make_context("health", args[2:]).params
    check = service["healthcheck"]
    assert seconds(check["timeout"]) > params["timeout"], (
        f"docker would kill the check before it waited its --timeout {params['timeout']:g}s"
    )
    assert seconds(check["interval"]) >= seconds(check["timeout"])
    if params.get("beat"):
        settings = Settings.from_env(resolved_environment(service, HOST_ENV))
        first_run = max(settings.redrive_interval_s, settings.reconcile_interval_s)
        assert seconds(check.get("start_period", "0s")) > first_run, (
            "a new beat first runs each task one interval after it starts: --beat would report "
            "it unhealthy until then"
        )


def test_the_worker_health_waits_five_seconds(services: dict[str, dict[str, Any]]) -> None:
    args = healthcheck_args(services["worker"])
    assert option_value(args, "--timeout") == "5"


@pytest.mark.parametrize("name", ["worker", "exporter"])
def test_metrics_stay_inside_the_compose_network(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    # No authentication on /metrics: Prometheus reaches them on the compose network.
    assert not services[name].get("ports"), f"{name} must not publish its metrics on the host"


@pytest.mark.parametrize("name", MONITORING)
def test_monitoring_runs_only_in_its_profile_on_the_loopback(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    assert service.get("profiles") == ["monitoring"], f"{name} belongs to --profile monitoring"
    ports = host_ports(service)
    assert ports, f"{name} publishes no port"
    for address, published, _ in ports:
        assert address == "127.0.0.1", f"{name} publishes {published} beyond the loopback"
    for other, spec in services.items():
        if "monitoring" not in (spec.get("profiles") or []):
            assert name not in (spec.get("depends_on") or {}), f"{other} needs {name}"


@pytest.mark.parametrize("name", MONITORING)
def test_monitoring_mounts_files_of_the_repository(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], name: str
) -> None:
    found = mounts(services[name])
    assert found, f"{name} mounts nothing"
    declared = set(compose.get("volumes") or {})
    for source, _, read_only in found:
        if is_bind(source):
            path = (ROOT / source).resolve()
            assert path.exists(), f"{name} mounts {source}, which is not in the repository"
            assert path.is_relative_to(MONITORING_DIR), f"{name} mounts {source} from elsewhere"
            assert read_only, f"{name} must mount {source} read-only"
        else:
            assert source in declared, f"{name} uses the undeclared volume {source}"
            assert not read_only, f"{name} keeps its data in {source}: it must be writable"


def test_prometheus_scrapes_every_worker_on_its_metrics_port(
    services: dict[str, dict[str, Any]],
) -> None:
    job = scrape_jobs().get(WORKERS_JOB)
    assert job is not None, f"prometheus.yml has no {WORKERS_JOB} job"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    discovery = job.get("dns_sd_configs")
    assert discovery, "scaled workers are found through DNS (every replica's A record)"
    assert not job.get("static_configs"), "a static target would scrape one replica at random"
    settings = Settings.from_env(resolved_environment(services["worker"], HOST_ENV))
    assert settings.metrics_port is not None, "the workers serve no metrics"
    for config in discovery:
        assert config.get("type") == "A"
        assert config.get("names") == ["worker"]
        assert "worker" in services
        assert config.get("port") == settings.metrics_port, (
            f"Prometheus scrapes port {config.get('port')}, the workers serve "
            f"METRIX_METRICS_PORT={settings.metrics_port}"
        )


def test_prometheus_scrapes_the_exporter_on_its_port(services: dict[str, dict[str, Any]]) -> None:
    job = scrape_jobs().get(EXPORTER_JOB)
    assert job is not None, f"prometheus.yml has no {EXPORTER_JOB} job"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for config in job.get("static_configs", []) for target in config["targets"]]
    assert len(targets) == 1, "one exporter per deployment"
    host, _, port = targets[0].rpartition(":")
    assert host == "exporter"
    assert host in services
    args = argv(services["exporter"])
    served = cli.commands["exporter"].make_context("exporter", args[2:]).params["port"]
    assert int(port) == served, f"Prometheus scrapes {targets[0]}, the exporter serves {served}"


def test_prometheus_loads_the_alert_rules(services: dict[str, dict[str, Any]]) -> None:
    # The image reads /etc/prometheus/prometheus.yml; compose mounts the directory there.
    assert mounted_at(services["prometheus"], "/etc/prometheus") == PROMETHEUS_DIR
    config = load_yaml(PROMETHEUS_CONFIG)
    rule_files = [(PROMETHEUS_CONFIG.parent / name).resolve() for name in config["rule_files"]]
    assert ALERTS.resolve() in rule_files, "prometheus.yml does not load alerts.yml"
    for path in rule_files:
        # Relative to the configuration file, which compose mounts with its directory.
        assert path.is_file(), f"prometheus.yml loads {path}, which does not exist"
        assert path.parent == PROMETHEUS_DIR


def test_every_alert_is_a_complete_rule() -> None:
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert all(names), "every rule must be an alert (no recording rules here)"
    assert len(names) == len(set(names)), "alert names repeat"
    missing = [name for name in REQUIRED_ALERTS if name not in names]
    assert not missing, f"alerts.yml lacks {missing}"
    for rule in rules:
        name = rule["alert"]
        for key in ("expr", "for", "labels", "annotations"):
            assert key in rule, f"{name} has no {key}"
        assert isinstance(rule["expr"], str), f"{name}: expr is not a string"
        assert rule["expr"].strip(), f"{name}: empty expr"
        assert balanced(rule["expr"]), f"{name}: unbalanced brackets or quotes"
        assert _PROMETHEUS_DURATION.fullmatch(str(rule["for"])), f"{name}: for is no duration"
        assert rule["labels"].get("severity") in {"critical", "warning"}, name
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key), f"{name} has no {key} annotation"


def test_every_alert_has_its_section_in_the_operations_page() -> None:
    anchors = {
        slug(line.lstrip("#"))
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / page).resolve() == OPERATIONS, f"{rule['alert']}: {page}"
        assert anchor in anchors, f"docs/operations.md has no section #{anchor}"
        assert slug(rule["alert"]) == anchor, f"{rule['alert']} points at #{anchor}"


def test_alerts_and_panels_name_the_jobs_prometheus_scrapes() -> None:
    jobs = set(scrape_jobs())
    queries = [rule["expr"] for rule in alert_rules()] + dashboard_queries(dashboard())
    named = {job for query in queries for job in _JOB.findall(query)}
    assert WORKERS_JOB in named, "nothing watches whether the workers are up"
    assert named <= jobs, f"jobs Prometheus does not scrape: {sorted(named - jobs)}"


def test_the_code_exports_the_metrics_operations_rely_on() -> None:
    families = exported_metrics()
    series = set().union(*families.values())
    # The contract of docs/operations.md; a rename in the code fails here.
    for name in (
        "metrix_s2s_deliveries_total",
        "metrix_s2s_dead_lettered_total",
        "metrix_s2s_request_duration_seconds_bucket",
        "metrix_s2s_http_responses_total",
        "metrix_s2s_up",
        "metrix_s2s_oldest_pending_age_seconds",
        "metrix_s2s_last_run_timestamp_seconds",
    ):
        assert name in series, f"metrix_s2s.metrics no longer exports {name}"


def test_alerts_use_only_metrics_the_code_exports() -> None:
    series = set().union(*exported_metrics().values())
    used: set[str] = set()
    for rule in alert_rules():
        named = metric_names(rule["expr"])
        # the pattern works: a rule watches a metrix-s2s metric, or a job's scrapes (up)
        assert named or _JOB.search(rule["expr"]), f"{rule['alert']} watches nothing of ours"
        unknown = named - series
        assert not unknown, f"{rule['alert']} uses metrics nothing exports: {sorted(unknown)}"
        used |= named
    assert len(used) >= 5


def test_the_dashboard_uses_only_metrics_the_code_exports_and_shows_them_all() -> None:
    families = exported_metrics()
    series = set().union(*families.values())
    queries = dashboard_queries(dashboard())
    assert queries, "the dashboard has no query"
    used = set().union(*(metric_names(query) for query in queries))
    unknown = used - series
    assert not unknown, f"the dashboard uses metrics nothing exports: {sorted(unknown)}"
    not_shown = sorted(name for name, names in families.items() if not names & used)
    assert not not_shown, f"the dashboard does not show {not_shown}"


def test_the_operations_page_names_only_exported_metrics_and_every_one() -> None:
    families = exported_metrics()
    # A histogram is named by its family in prose; its series by their suffixes.
    allowed = set().union(*families.values()) | {
        name for name, names in families.items() if name not in names and len(names) > 1
    }
    named = metric_names(OPERATIONS.read_text())
    unknown = named - allowed
    assert not unknown, f"docs/operations.md names metrics nothing exports: {sorted(unknown)}"
    missing = sorted(name for name, names in families.items() if not (names | {name}) & named)
    assert not missing, f"docs/operations.md does not explain {missing}"


def test_the_dashboard_is_provisioned_against_the_prometheus_service(
    services: dict[str, dict[str, Any]],
) -> None:
    board = dashboard()
    assert board.get("schemaVersion") == 39
    assert board.get("uid"), "a provisioned dashboard needs a stable uid"
    sources = load_yaml(DATASOURCES)["datasources"]
    assert len(sources) == 1
    source = sources[0]
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus"
    assert url.hostname in services
    container_ports = {int(target) for _, _, target in host_ports(services["prometheus"])}
    assert url.port in container_ports, f"Grafana queries {source['url']}, not Prometheus's port"
    panels = board.get("panels")
    assert isinstance(panels, list)
    assert panels, "the dashboard has no panels"
    ids = [panel.get("id") for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        title = panel.get("title")
        assert title, f"panel {panel.get('id')} has no title"
        assert panel.get("datasource", {}).get("uid") == source["uid"], title
        targets = panel.get("targets")
        assert targets, f"panel {title!r} has no query"
        for target in targets:
            assert target.get("datasource", {}).get("uid", source["uid"]) == source["uid"], title
            assert target.get("expr"), f"panel {title!r} has a query without expr"
            assert balanced(target["expr"]), f"panel {title!r}: unbalanced {target['expr']}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {title!r} is wider than the dashboard"
        cells_of_panel = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & cells_of_panel, f"panel {title!r} overlaps another"
        cells |= cells_of_panel
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            assert variable["datasource"]["uid"] == source["uid"], variable["name"]


def test_grafana_loads_the_dashboard_from_its_mount(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    provisioning = mounted_at(grafana, "/etc/grafana/provisioning")
    assert DATASOURCES.is_relative_to(provisioning)
    assert DASHBOARD_PROVIDERS.is_relative_to(provisioning)
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert providers, "no dashboard provider"
    for provider in providers:
        assert provider.get("type", "file") == "file"
        path = provider["options"]["path"]
        assert path == "/var/lib/grafana/dashboards"
        assert (mounted_at(grafana, path) / DASHBOARD.name).resolve() == DASHBOARD.resolve(), (
            f"Grafana reads dashboards from {path}, where {DASHBOARD.name} is not mounted"
        )


# ---------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore
# ---------------------------------------------------------------------------------------------


def test_the_base_image_is_a_python_the_project_supports() -> None:
    # FROM [--platform=...] IMAGE [AS NAME]; the last FROM is the image that runs.
    bases = [
        next(arg for arg in rest.split() if not arg.startswith("--"))
        for keyword, rest in dockerfile_instructions()
        if keyword == "FROM"
    ]
    assert bases, "the Dockerfile has no FROM"
    pattern = r"(?:docker\.io/)?(?:library/)?python:(\d+)\.(\d+)(?:[.-].*)?"
    match = re.fullmatch(pattern, bases[-1])
    assert match, f"{bases[-1]} is not an official python:X.Y image"
    version = f"{match.group(1)}.{match.group(2)}"
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    assert version in SpecifierSet(requires), f"python {version} does not satisfy {requires}"
    assert tuple(map(int, version.split("."))) >= (3, 11)


def test_the_image_installs_the_project() -> None:
    runs = [rest for keyword, rest in dockerfile_instructions() if keyword == "RUN"]
    installs = [
        shlex.split(command)
        for run in runs
        for command in re.split(r"&&|;", run)
        if "pip" in command and "install" in command
    ]
    assert any("." in args for args in installs), "the image must 'pip install .' the project"
    assert all("--no-cache-dir" in args for args in installs)


def test_the_image_copies_what_the_build_needs() -> None:
    copied: list[str] = []
    for keyword, rest in dockerfile_instructions():
        if keyword not in {"COPY", "ADD"}:
            continue
        args = [arg for arg in shlex.split(rest) if not arg.startswith("--")]
        assert not any(arg.startswith("--from") for arg in shlex.split(rest))
        sources = args[:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not here"
        copied.extend(source.rstrip("/") for source in sources)
    readme = tomllib.loads(PYPROJECT.read_text())["project"]["readme"]
    for needed in (*IMAGE_NEEDS, readme):
        assert any(needed == path or needed.startswith(path + "/") for path in copied), (
            f"the Dockerfile does not copy {needed}"
        )
    patterns = dockerignore_patterns()
    shut_out = [path for path in copied if ignored(path, patterns)]
    assert not shut_out, f".dockerignore keeps {shut_out} out of the build context"


def test_the_build_context_leaves_out_local_state() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "tests", ".pytest_cache", "metrix_s2s/__pycache__", ".env"):
        assert ignored(path, patterns), f".dockerignore does not exclude {path}"


def test_the_image_runs_as_a_user_not_root() -> None:
    users = [rest.split(":")[0] for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users, "the Dockerfile never sets USER: the containers would run as root"
    assert users[-1] not in {"root", "0"}


def test_the_image_runs_the_console_script() -> None:
    instructions = dict(dockerfile_instructions())  # the last of each kind counts
    assert "CMD" in instructions
    cmd = yaml.safe_load(instructions["CMD"])  # exec form: a JSON array
    assert isinstance(cmd, list), "CMD must use the exec form, so Celery gets docker's SIGTERM"
    assert cmd[0] in tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert cmd[1] in cli.commands
    assert yaml.safe_load(instructions.get("ENTRYPOINT", "[]")) == []
    env = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "ENV")
    assert re.search(r"PYTHONUNBUFFERED=1\b", env), "logs must not sit in a buffer"
