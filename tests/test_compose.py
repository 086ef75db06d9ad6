"""docker-compose.yml, the Dockerfile and .dockerignore, checked against the package.

No Docker engine is needed: the files are parsed and every name in them that the package defines
(the console script, the ``worker`` and ``beat`` subcommands and their options, Celery's options,
the environment variables, the fake Metrix's options, the paths the image copies) is looked up in
the package itself, so a rename on either side fails here. When ``docker compose`` is available,
``docker compose config`` validates the file as well.
"""

from __future__ import annotations

import fnmatch
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

import metrix_s2s.cli
from metrix_s2s.cli import cli
from metrix_s2s.settings import DEFAULT_BASE_URL, Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

SERVICES = ("redis", "worker", "beat", "flower", "fake-metrix")
#: The services that run a ``metrix-s2s`` subcommand of the same name, and the Celery command
#: that subcommand execs (the options after ``--`` are that command's).
PROCESSES = {"worker": celery_worker, "beat": celery_beat}
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
    assert environment(services["beat"]) == worker_env, "worker and beat must see the same settings"
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


@pytest.mark.parametrize("name", sorted(PROCESSES))
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


@pytest.mark.parametrize("name", ["worker", "beat", "fake-metrix"])
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
    for profile in ([], ["--profile", "local"]):
        result = subprocess.run(
            [*compose_cmd, *profile, "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **HOST_ENV},
        )
        assert result.returncode == 0, result.stderr


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
