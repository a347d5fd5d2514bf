"""The deployment files, Dockerfile and docker-compose.yml, checked against the code.

CI has no Docker engine, so neither file can be built or run here. Instead both are parsed and
every fact they state about the code is checked against the code itself: the settings they set,
the port, the health routes, the commands they run (hmem's with its own parser, Ray's with Ray's),
the torch pin, the extras the image installs. A change on either side then breaks a test here
instead of an image in production. docs/deploy.md's commands and settings files are checked the
same way.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import ipaddress
import json
import os
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from server.cli import build_parser
from server.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
IMAGE = "image"  # the Dockerfile's own container (`docker run`), beside the compose services
COMPOSE_SERVICES_OF_IMAGE = ("bank-init", "hmem")  # the default profile's
CLUSTER_PROFILE = "cluster"
CLUSTER_SERVICES = ("ray-head", "ray-worker")  # `hmem serve --replicas` on two Ray nodes
SERVED_BY_IMAGE = (IMAGE, *COMPOSE_SERVICES_OF_IMAGE, *CLUSTER_SERVICES)
EXTRAS_ARG = "HMEM_EXTRAS"  # the Dockerfile's build argument: extras installed with the package
URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s'\"\])]+", re.IGNORECASE)


# --- Dockerfile ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        """The one that takes effect: of CMD, ENTRYPOINT, HEALTHCHECK, USER the last wins."""
        found = self.all(keyword)
        return found[-1] if found else None


def parse_instructions(text: str) -> list[Instruction]:
    """Instructions with `\\` continuations joined; comments and blank lines dropped, also inside
    a continuation, as Docker does."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


@functools.cache
def stages() -> list[Stage]:
    result: list[Stage] = []
    for instruction in parse_instructions((REPO / "Dockerfile").read_text()):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            result.append(Stage(base=words[0], name=name))
        elif result:
            result[-1].instructions.append(instruction)
    return result


def runtime() -> Stage:
    return stages()[-1]


def is_exec_form(args: str) -> bool:
    """CMD ["a", "b"] runs `a` itself; shell form runs `/bin/sh -c`, which keeps the signals."""
    try:
        return isinstance(json.loads(args), list)
    except json.JSONDecodeError:
        return False


def command_argv(args: str) -> list[str]:
    """The words of a CMD, ENTRYPOINT or HEALTHCHECK CMD, exec (JSON) or shell form."""
    return [str(w) for w in json.loads(args)] if is_exec_form(args) else shlex.split(args)


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in runtime().all("ENV"):
        words = shlex.split(instruction.args)
        if "=" not in words[0]:  # the legacy form, `ENV KEY a value with spaces`
            key, _, value = instruction.args.partition(" ")
            env[key] = value.strip()
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def image_argv(compose_command: list[str] | None = None) -> list[str]:
    """What a container of the image runs: its ENTRYPOINT followed by CMD or compose's command."""
    entrypoint = runtime().last("ENTRYPOINT")
    cmd = runtime().last("CMD")
    argv = command_argv(entrypoint.args) if entrypoint else []
    if compose_command is not None:
        return argv + compose_command
    return argv + (command_argv(cmd.args) if cmd else [])


def image_healthcheck() -> list[str]:
    instruction = runtime().last("HEALTHCHECK")
    assert instruction is not None, "the runtime stage has no HEALTHCHECK"
    found = re.fullmatch(r"(?:--\S+\s+)*CMD\s+(.+)", instruction.args, re.DOTALL)
    assert found, f"HEALTHCHECK without a command: {instruction.args!r}"
    return command_argv(found[1])


def pip_install_targets(args: str) -> list[str]:
    """What the `pip install` commands of a RUN install, as written (options left out)."""
    words = shlex.split(args)
    targets: list[str] = []
    for i in range(len(words) - 1):
        if words[i : i + 2] != ["pip", "install"]:
            continue
        for word in words[i + 2 :]:
            if word in {"&&", "||", ";", "|"}:
                break
            if not word.startswith("-"):
                targets.append(word)
    return targets


def installs_the_package(args: str) -> bool:
    """`pip install .`: the package itself, with or without extras (`.[x]`, `.${...}`)."""
    return any(re.fullmatch(r"\.(\[.*\]|\$.*)?", t) for t in pip_install_targets(args))


def package_install() -> tuple[Stage, Instruction]:
    """The one stage that installs the package, and its RUN that does."""
    found = [(s, run) for s in stages() for run in s.all("RUN") if installs_the_package(run.args)]
    assert len(found) == 1, "the package is not installed with `pip install .` in one RUN"
    return found[0]


def build_args(stage: Stage) -> dict[str, str | None]:
    """The ARGs a stage declares, with their defaults (None: no default)."""
    declared: dict[str, str | None] = {}
    for instruction in stage.all("ARG"):
        for word in shlex.split(instruction.args):
            name, sep, default = word.partition("=")
            declared[name] = default if sep else None
    return declared


def installed_with(extras: str) -> list[str]:
    """What the package's RUN installs when built with HMEM_EXTRAS=`extras`: the RUN run by
    /bin/sh, as Docker runs it, with `pip` a shell function that prints its arguments."""
    _, run = package_install()
    assert not re.search(r"[;&|<>`]|\$\(", run.args), f"more than one pip install: {run.args}"
    printed = subprocess.run(
        ["/bin/sh", "-c", f'pip() {{ printf "%s\\n" "$@"; }}; {run.args}'],
        env={"PATH": os.defpath, EXTRAS_ARG: extras},
        capture_output=True,
        text=True,
        check=True,
    )
    return printed.stdout.splitlines()[1:]  # after "install"


def copy_sources(stage: Stage) -> list[str]:
    """What the stage's COPY instructions take from the build context (not from other stages)."""
    sources: list[str] = []
    for instruction in stage.all("COPY"):
        words = command_argv(instruction.args)
        if any(w.startswith("--from") for w in words):
            continue
        sources += [w.rstrip("/") for w in words if not w.startswith("--")][:-1]
    return sources


def dockerignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context. Docker's rules: the last
    matching pattern wins, `!` re-includes, and a pattern that matches a directory matches
    everything in it."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    parts = path.strip("/").split("/")
    ignored = False
    for pattern in patterns:
        glob = pattern.removeprefix("!").strip("/").split("/")
        if any(_glob_match(glob, parts[:n]) for n in range(1, len(parts) + 1)):
            ignored = not pattern.startswith("!")
    return ignored


def _glob_match(glob: list[str], parts: list[str]) -> bool:
    if not glob:
        return not parts
    if glob[0] == "**":
        return any(_glob_match(glob[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts) and fnmatch.fnmatchcase(parts[0], glob[0]) and _glob_match(glob[1:], parts[1:])
    )


# --- docker-compose.yml -------------------------------------------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def service(name: str) -> dict[str, Any]:
    services: dict[str, dict[str, Any]] = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def compose_env(name: str) -> dict[str, str | None]:
    """A service's environment; None for a name passed through from the host (no value)."""
    return spec_env(service(name))


def spec_env(spec: dict[str, Any]) -> dict[str, str | None]:
    """The environment of a service's spec, from docker-compose.yml or an override file."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        pairs = [entry.partition("=") for entry in env]
        return {key: (value if sep else None) for key, sep, value in pairs}
    return {key: None if value is None else str(value) for key, value in env.items()}


def container_env(name: str) -> dict[str, str | None]:
    """The environment inside a container of the image: its ENV under compose's environment."""
    return {**image_env(), **(compose_env(name) if name != IMAGE else {})}


def interpolated(value: str) -> str | None:
    """`value` as Compose reads it when the host sets nothing: `${VAR:-default}` is `default`;
    None when it needs a host variable."""
    unresolved = False

    def substitute(found: re.Match[str]) -> str:
        nonlocal unresolved
        if found["op"] in ("-", ":-"):
            return found["arg"]
        unresolved = True
        return ""

    variable = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|\$(?=\w)")
    text = variable.sub(substitute, value.replace("$$", "\0"))
    return None if unresolved else text.replace("\0", "$")


def literal_env(name: str) -> dict[str, str]:
    """The variables of `name`'s container whose values the files fix."""
    env = {key: interpolated(v) for key, v in container_env(name).items() if v is not None}
    return {key: value for key, value in env.items() if value is not None}


def container_ports(name: str) -> set[int]:
    ports: set[int] = set()
    for port in service(name).get("ports", []):
        target = port["target"] if isinstance(port, dict) else str(port).rsplit(":", 1)[-1]
        ports.add(int(str(target).split("/")[0]))
    return ports


def mounts(name: str) -> dict[str, str]:
    """Mount point -> volume (or host path) of a service."""
    return spec_mounts(service(name))


def spec_mounts(spec: dict[str, Any]) -> dict[str, str]:
    """Mount point -> volume (or host path) of a service's spec."""
    result: dict[str, str] = {}
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            result[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            result[target] = source
    return result


def compose_healthcheck(name: str) -> list[str]:
    test = service(name).get("healthcheck", {}).get("test", [])
    return [test] if isinstance(test, str) else [str(w) for w in test]


def healthcheck_urls() -> list[str]:
    # The cluster's ingress forwards every path but /metrics to a replica's app: the same routes.
    services = [*COMPOSE_SERVICES_OF_IMAGE, "ray-head"]
    commands = [image_healthcheck()] + [compose_healthcheck(s) for s in services]
    return [url for argv in commands for url in URL.findall(" ".join(argv))]


def option(argv: list[str], name: str) -> str | None:
    for i, word in enumerate(argv):
        if word == name and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(f"{name}="):
            return word.partition("=")[2]
    return None


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


# --- settings -----------------------------------------------------------------------------------


def test_hmem_variables_are_settings_fields() -> None:
    sources = {"Dockerfile": image_env()} | {
        f"compose {name}": compose_env(name) for name in compose()["services"]
    }
    checked = 0
    for source, env in sources.items():
        for variable in env:
            if not variable.startswith("HMEM_"):
                continue
            field_name = variable.removeprefix("HMEM_").split("__")[0].lower()
            assert field_name in Settings.model_fields, (
                f"{source} sets {variable}, but Settings has no field {field_name!r}"
            )
            checked += 1
    assert checked, "no HMEM_* variable found: the parsers are not reading the files"


@pytest.mark.parametrize("name", SERVED_BY_IMAGE)
def test_literal_hmem_values_are_valid_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith("HMEM_"):
            monkeypatch.delenv(variable)
    env = {k: v for k, v in literal_env(name).items() if k.startswith("HMEM_")}
    for variable, value in env.items():
        # An empty value is not "unset": HMEM_ADMIN_KEY= would be an admin key of "".
        assert value, f"{variable} is empty in {name}; leave it out or pass it through instead"
        monkeypatch.setenv(variable, value)

    settings = load_settings()

    # State goes where the image keeps a volume, not into the container's writable layer.
    volume = runtime().last("VOLUME")
    assert volume is not None
    assert str(settings.data_dir) in json.loads(volume.args)


# --- the port and the health routes -------------------------------------------------------------


def test_container_port_agrees_everywhere() -> None:
    argv = image_argv()
    port = option(argv, "--port")
    expose = [int(p.split("/")[0]) for i in runtime().all("EXPOSE") for p in i.args.split()]
    ports: dict[str, int | None] = {
        "Settings.port default": Settings.model_fields["port"].default,
        "CMD --port": int(port) if port else None,
        **{f"EXPOSE {p}": p for p in expose},
        **{f"compose hmem publishes {p}": p for p in container_ports("hmem")},
        **{f"compose ray-head publishes {p}": p for p in container_ports("ray-head")},
        **{f"healthcheck {url}": urlsplit(url).port for url in healthcheck_urls()},
    }
    assert len(ports) >= 5, ports
    assert set(ports.values()) == {8000}, ports
    # Settings' default host is loopback, unreachable through a published port.
    assert ipaddress.ip_address(option(argv, "--host") or "127.0.0.1").is_unspecified


def test_healthchecks_call_loopback_with_python() -> None:
    urls = healthcheck_urls()
    assert {urlsplit(url).path for url in urls} == {"/health", "/ready"}
    assert all(urlsplit(url).hostname == "127.0.0.1" for url in urls)
    # python:*-slim has neither curl nor wget; the image's own interpreter is on PATH.
    for argv in [image_healthcheck(), compose_healthcheck("hmem"), compose_healthcheck("ray-head")]:
        assert re.search(r"\bpython3?\b", " ".join(argv)), argv
        assert not {"curl", "wget"} & set(" ".join(argv).split()), argv


def test_healthcheck_paths_are_app_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.api.app import create_app

    for variable in list(os.environ):
        if variable.startswith("HMEM_"):
            monkeypatch.delenv(variable)
    app = create_app(load_settings(data_dir=tmp_path))
    routes = set(app.openapi()["paths"])
    for url in healthcheck_urls():
        assert urlsplit(url).path in routes, f"{url} is not a route of the app"


# --- commands -----------------------------------------------------------------------------------


def test_commands_parse() -> None:
    script = next(iter(pyproject()["project"]["scripts"]))
    commands = {
        "Dockerfile CMD": image_argv(),
        "compose bank-init": image_argv(service("bank-init")["command"]),
    }
    parsed = {}
    for source, argv in commands.items():
        assert argv[0] == script, f"{source} runs {argv[0]!r}, not the {script!r} script"
        try:
            parsed[source] = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{source}: `{shlex.join(argv)}` is not a valid command")

    assert parsed["Dockerfile CMD"].command == "serve"
    push = parsed["compose bank-init"]
    assert (push.command, push.bank_command) == ("bank", "push")
    # The placement must come from the same HMEM_* environment as the server's, not from flags.
    assert push.tier == []
    assert push.config is None
    assert push.create_bucket, "a fresh MinIO has no bucket"


# --- the image ----------------------------------------------------------------------------------


def test_torch_is_pinned_and_installed_before_the_package() -> None:
    pins = [d for d in pyproject()["project"]["dependencies"] if re.match(r"torch\b", d)]
    assert len(pins) == 1, pins
    assert pins[0].startswith("torch=="), f"pyproject.toml does not pin torch: {pins[0]}"
    pin = pins[0]
    for stage in stages():
        for run in stage.all("RUN"):
            assert re.findall(r"torch\S*", run.args) in ([], [pin]), run.args

    builder, _ = package_install()
    runs = builder.all("RUN")
    torch_installs = [i for i, run in enumerate(runs) if pin in run.args]
    package_installs = [i for i, run in enumerate(runs) if installs_the_package(run.args)]
    assert torch_installs, "torch is not installed in the stage that installs the package"
    # Its own layer, first: cached while the code changes, and resolved before anything else.
    assert max(torch_installs) < min(package_installs)


def test_builder_copies_what_pip_install_needs() -> None:
    project = pyproject()
    packages = [p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]]
    needed = {"pyproject.toml", project["project"]["readme"], *packages}
    copied = {source for stage in stages() for source in copy_sources(stage)}
    assert needed <= copied, f"not copied into the build: {needed - copied}"
    for source in needed:
        path = REPO / source
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative:
                assert not dockerignored(relative), f".dockerignore leaves out {relative}"
    for secret_or_bulk in [".env", ".venv/bin/python", ".git/HEAD", "bench/out/x.png"]:
        assert dockerignored(secret_or_bulk), f"{secret_or_bulk} would be sent to the daemon"


def test_multi_stage_build_copies_the_venv() -> None:
    assert len(stages()) >= 2
    # A virtualenv links to its interpreter: builder and runtime need the same base image.
    assert len({stage.base for stage in stages()}) == 1, [s.base for s in stages()]
    assert stages()[0].base.startswith("python:3.11-slim")
    builder_names = {s.name for s in stages()[:-1]}
    copies = [command_argv(c.args) for c in runtime().all("COPY")]
    assert any(
        argv[-2:] == ["/opt/venv", "/opt/venv"]
        and any(w.removeprefix("--from=") in builder_names for w in argv)
        for argv in copies
    ), copies
    assert image_env()["PATH"].startswith("/opt/venv/bin:")


def test_runtime_runs_as_a_non_root_user() -> None:
    stage = runtime()
    user = stage.last("USER")
    cmd = stage.last("CMD")
    assert user is not None
    assert cmd is not None
    assert user.args.split(":")[0] not in {"root", "0"}, user.args
    assert user.line < cmd.line
    # The user owns the data directory, before VOLUME (changes after VOLUME are discarded).
    volume = stage.last("VOLUME")
    data_dir = image_env()["HMEM_DATA_DIR"]
    assert volume is not None
    assert json.loads(volume.args) == [data_dir]
    chowns = [r for r in stage.all("RUN") if re.search(rf"chown\s+\S+\s+{data_dir}\b", r.args)]
    assert chowns
    assert chowns[0].line < volume.line
    # Exec form: the server is PID 1 and gets `docker stop`'s SIGTERM, not a shell.
    assert is_exec_form(cmd.args)


def test_allocator_thresholds_are_set() -> None:
    env = image_env()
    for variable in ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]:
        assert int(env[variable]) >= 2**30, f"{variable} keeps safetensors loading slow"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_no_registry_or_index_hosts() -> None:
    allowed_hosts = {"127.0.0.1", *compose()["services"]}
    for file in ["Dockerfile", "docker-compose.yml", ".dockerignore"]:
        text = (REPO / file).read_text()
        for url in URL.findall(text):
            assert urlsplit(url).hostname in allowed_hosts, f"{file} names a host: {url}"
        assert not re.search(r"--(extra-)?index-url|--trusted-host", text), file
    images = [s.base for s in stages()] + [
        spec["image"] for spec in compose()["services"].values() if "image" in spec
    ]
    for image in images:
        first = image.split("/")[0] if "/" in image else ""
        assert not re.search(r"[.:]|^localhost$", first), f"{image} names a registry"


# --- compose ------------------------------------------------------------------------------------


def test_compose_services_and_startup_order() -> None:
    assert "version" not in compose(), "the Compose spec has no top-level version"
    hmem, bank_init = service("hmem"), service("bank-init")
    assert service("minio")["image"].startswith("minio/minio:RELEASE.")
    assert hmem["depends_on"]["bank-init"]["condition"] == "service_completed_successfully"
    assert hmem["depends_on"]["minio"]["condition"] == "service_healthy"
    assert bank_init["depends_on"]["minio"]["condition"] == "service_healthy"
    # A one-shot job: restarted, it would never complete and hmem would never start.
    assert bank_init["restart"] == "no"
    assert hmem["restart"] == "unless-stopped"
    for name, spec in compose()["services"].items():
        for target, dependency in spec.get("depends_on", {}).items():
            if dependency["condition"] == "service_healthy":
                has_own = "healthcheck" in service(target)
                assert has_own or "build" in service(target), f"{name} waits on {target}"


def test_cloud_endpoint_is_the_minio_api() -> None:
    minio_command = service("minio")["command"]
    console_port = int((option(minio_command, "--console-address") or ":0").rsplit(":")[-1])
    for name in COMPOSE_SERVICES_OF_IMAGE:
        endpoint = compose_env(name).get("HMEM_CLOUD_ENDPOINT")
        assert endpoint, f"{name} has no HMEM_CLOUD_ENDPOINT"
        url = urlsplit(endpoint)
        host = url.hostname or ""
        assert host in compose()["services"], f"{endpoint} is not a compose service"
        assert url.port in container_ports(host), f"{host} has no port {url.port}"
        assert url.port != console_port, "the endpoint is MinIO's web console"


def test_bank_init_and_server_share_state() -> None:
    assert service("bank-init")["build"] == service("hmem")["build"]
    assert service("bank-init")["image"] == service("hmem")["image"]
    data_dir = container_env("hmem")["HMEM_DATA_DIR"]
    assert data_dir == container_env("bank-init")["HMEM_DATA_DIR"]
    volume = mounts("hmem").get(str(data_dir))
    assert volume in compose()["volumes"], "state must live on a named volume"
    assert mounts("bank-init").get(str(data_dir)) == volume
    # Equal settings give an equal placement: the server reads blocks where the job put them.
    pushed = {k: v for k, v in compose_env("bank-init").items() if k.startswith(("HMEM_", "AWS_"))}
    served = compose_env("hmem")
    assert "HMEM_CLOUD_BUCKET" in pushed
    assert {k: served.get(k) for k in pushed} == pushed


def test_s3_credentials_are_minio_root_user() -> None:
    minio = compose_env("minio")
    for name in COMPOSE_SERVICES_OF_IMAGE:
        env = compose_env(name)
        assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
        assert env.get("AWS_DEFAULT_REGION")
    # MinIO refuses to start with a shorter user (3) or password (8).
    user = interpolated(minio["MINIO_ROOT_USER"] or "")
    password = interpolated(minio["MINIO_ROOT_PASSWORD"] or "")
    assert len(user or "") >= 3
    assert len(password or "") >= 8


# --- who can reach the server, and serving your own bank ----------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it, with its `!override` and `!reset` tags on a value."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!override", "!reset"):
    ComposeLoader.add_constructor(_tag, _untagged)


def deploy_doc() -> str:
    return (REPO / "docs" / "deploy.md").read_text()


def doc_overrides() -> dict[str, dict[str, Any]]:
    """The override files docs/deploy.md shows, each by its first line (a comment naming it)."""
    blocks = re.findall(r"```yaml\n(.*?)```", deploy_doc(), re.DOTALL)
    # ComposeLoader is a SafeLoader: it builds plain data only.
    overrides = {b.splitlines()[0]: yaml.load(b, ComposeLoader) for b in blocks}  # noqa: S506
    assert all(name.startswith("# docker-compose.override.yml") for name in overrides), overrides
    return overrides


def published(port: str | int | dict[str, Any]) -> tuple[str | None, int]:
    """(host address, container port) of a `ports` entry; no address: every interface."""
    if isinstance(port, dict):
        return port.get("host_ip"), int(str(port["target"]).split("/")[0])
    text = str(port).split("/")[0]
    if text.startswith("["):  # "[::1]:8000:8000"
        host, _, rest = text[1:].partition("]:")
        return host, int(rest.rsplit(":", 1)[-1])
    parts = text.split(":")
    return (parts[0] if len(parts) == 3 else None), int(parts[-1])


def loopback(host: str | None) -> bool:
    return host is not None and (host == "localhost" or ipaddress.ip_address(host).is_loopback)


def requires_api_keys(spec: dict[str, Any]) -> bool:
    """Compose refuses to start the service while HMEM_API_KEYS is unset or empty."""
    value = spec_env(spec).get("HMEM_API_KEYS") or ""
    return re.fullmatch(r"\$\{HMEM_API_KEYS:\?[^}]+\}", value) is not None


def test_published_port_parsing() -> None:
    assert published("127.0.0.1:8000:8000") == ("127.0.0.1", 8000)
    assert published("8000:8000") == (None, 8000)
    assert published("8000") == (None, 8000)
    assert published("[::1]:8000:8000/tcp") == ("::1", 8000)
    assert published({"target": 8000, "host_ip": "192.0.2.1"}) == ("192.0.2.1", 8000)


def test_compose_publishes_every_port_on_loopback_only() -> None:
    for name, spec in compose()["services"].items():
        for port in spec.get("ports", []):
            host, _ = published(port)
            assert loopback(host), f"compose publishes {name}'s {port!r} beyond this machine"
    for published_flag in re.findall(r"docker run .*?-p\s+(\S+)", deploy_doc()):
        assert loopback(published(published_flag)[0]), (
            f"docs/deploy.md: docker run -p {published_flag}"
        )


@pytest.mark.parametrize("override", list(doc_overrides()))
def test_no_override_publishes_the_server_beyond_loopback_without_keys(override: str) -> None:
    for name, spec in doc_overrides()[override]["services"].items():
        assert name in compose()["services"], f"{override}: no service {name!r} to override"
        beyond = [p for p in spec.get("ports", []) if not loopback(published(p)[0])]
        if beyond:
            assert requires_api_keys(spec), f"{override}: {name} publishes {beyond} without keys"
            assert {published(p)[1] for p in beyond} <= container_ports(name)
        for variable in [v for v in spec_env(spec) if v.startswith("HMEM_")]:
            field_name = variable.removeprefix("HMEM_").split("__")[0].lower()
            assert field_name in Settings.model_fields, f"{override}: {variable} is no setting"


def test_the_docs_show_how_to_publish_the_server_with_keys() -> None:
    publishing = [
        spec
        for override in doc_overrides().values()
        for spec in override["services"].values()
        if any(not loopback(published(p)[0]) for p in spec.get("ports", []))
    ]
    assert publishing, "docs/deploy.md shows no override that publishes the server"
    assert all(requires_api_keys(spec) for spec in publishing)


def test_the_own_bank_override_gives_both_services_the_same_mounted_bank() -> None:
    (override,) = [o for o in doc_overrides().values() if "HMEM_BANK" in json.dumps(o)]
    specs = override["services"]
    assert set(specs) == set(COMPOSE_SERVICES_OF_IMAGE)
    banks = {name: spec_env(spec)["HMEM_BANK"] for name, spec in specs.items()}
    bank = banks["hmem"]
    assert bank is not None
    assert set(banks.values()) == {bank}, banks
    assert Path(bank).is_absolute()
    for name, spec in specs.items():
        assert bank in spec_mounts(spec), f"{name} does not mount the bank at {bank}"
        # Not the state volume: the bank is read, the state written.
        assert bank != container_env(name)["HMEM_DATA_DIR"]
    # bank-init names no bank, so it pushes the bank of its settings: HMEM_BANK.
    push = build_parser().parse_args(image_argv(service("bank-init")["command"])[1:])
    assert push.bank is None


# --- the cluster profile: `hmem serve --replicas` on Ray ------------------------------------------


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a one-line shell script, split at `&&`, `||`, `;` and `|`, with a
    leading `exec` and variable assignments left out: what each runs."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in {"&&", "||", ";", "|"}:
            commands.append([])
        elif commands[-1] or not (token == "exec" or re.fullmatch(r"\w+=.*", token)):
            commands[-1].append(token)
    return [c for c in commands if c]


def service_commands(name: str) -> list[list[str]]:
    """What a service of the image runs, command by command (`sh -c SCRIPT` split up)."""
    argv = image_argv(service(name)["command"])
    if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
        return shell_commands(argv[2])
    return [argv]


def parse_hmem(argv: list[str], source: str) -> Any:
    """`argv` (an `hmem ...` command) as the CLI's own parser reads it."""
    assert argv[0] == "hmem", f"{source} runs {argv[0]!r}, not hmem"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{source}: `{shlex.join(argv)}` is not a valid hmem command")


def parse_ray(argv: list[str], source: str) -> dict[str, Any]:
    """`argv` (a `ray SUBCOMMAND ...` command) as Ray's own CLI reads it: its options' values."""
    # Imported here: Ray's CLI imports Ray (about 2 s), which only these tests need.
    import click
    from ray.scripts.scripts import cli

    assert argv[0] == "ray", f"{source} runs {argv[0]!r}, not ray"
    command = cli.commands.get(argv[1])
    assert command is not None, f"{source}: `ray {argv[1]}` is no command of Ray's CLI"
    try:
        context = command.make_context(f"ray {argv[1]}", argv[2:])
    except click.ClickException as exc:
        pytest.fail(f"{source}: `{shlex.join(argv)}`: {exc.format_message()}")
    return dict(context.params)


def byte_size(text: str | int) -> int:
    """A Compose byte value (`shm_size: 1gb`, `512m`): its units are powers of 1024."""
    found = re.fullmatch(r"(\d+)\s*([kmg]?)b?", str(text).strip().lower())
    assert found, f"not a byte value: {text!r}"
    return int(found[1]) * 1024 ** " kmg".index(found[2] or " ")


def head_commands() -> tuple[dict[str, Any], Any]:
    """The head's `ray start` options and its `hmem serve` arguments, in the order they run."""
    commands = service_commands("ray-head")
    assert [c[:2] for c in commands] == [["ray", "start"], ["hmem", "serve"]], commands
    return parse_ray(commands[0], "compose ray-head"), parse_hmem(commands[1], "compose ray-head")


def worker_start() -> dict[str, Any]:
    commands = service_commands("ray-worker")
    assert [c[:2] for c in commands] == [["ray", "start"]], commands
    return parse_ray(commands[0], "compose ray-worker")


def test_byte_size_parsing() -> None:
    assert byte_size("1gb") == 2**30
    assert byte_size("512m") == 512 * 2**20
    assert byte_size(4096) == 4096


def test_cluster_services_start_only_under_their_profile() -> None:
    services = compose()["services"]
    for name in CLUSTER_SERVICES:
        assert service(name).get("profiles") == [CLUSTER_PROFILE], name
    # `docker compose up` is what it was: the same services, none of them waiting on a Ray node.
    default = {name for name, spec in services.items() if not spec.get("profiles")}
    assert default == {"minio", *COMPOSE_SERVICES_OF_IMAGE}
    for name in default:
        assert not set(service(name).get("depends_on", {})) & set(CLUSTER_SERVICES), name
        assert not set(mounts(name).values()) & {
            volume for node in CLUSTER_SERVICES for volume in mounts(node).values()
        }, f"{name} shares a volume with a Ray node"


def test_cluster_image_has_ray_and_the_default_image_does_not() -> None:
    builder, run = package_install()
    declared = build_args(builder)
    assert declared.get(EXTRAS_ARG) == "", f"{EXTRAS_ARG} must default to no extras"
    # Declared after the torch layer: a cluster build reuses that layer instead of redoing it.
    arg = next(i for i in builder.all("ARG") if EXTRAS_ARG in i.args)
    torch_runs = [r.line for r in builder.all("RUN") if "torch==" in r.args]
    assert torch_runs
    assert max(torch_runs) < arg.line < run.line
    assert installed_with("") == ["."]

    extras = pyproject()["project"]["optional-dependencies"]
    images = {service(name)["image"] for name in CLUSTER_SERVICES}
    assert len(images) == 1, "Ray needs the same Ray and Python on every node: one image"
    assert images.isdisjoint({service(name)["image"] for name in COMPOSE_SERVICES_OF_IMAGE}), (
        "two builds with different extras would tag one image"
    )
    builds = [service(name)["build"] for name in CLUSTER_SERVICES]
    assert all(b == builds[0] for b in builds)
    wanted = str(builds[0]["args"][EXTRAS_ARG])
    assert installed_with(wanted) == [f".[{wanted}]"]
    for extra in wanted.split(","):
        assert extra in extras, f"pyproject.toml has no extra {extra!r}"
    with_ray = [r for e in wanted.split(",") for r in extras[e] if re.match(r"ray\[", r)]
    assert any("serve" in re.split(r"[\[\],\s]+", r) for r in with_ray), (
        f"the extras {wanted!r} do not install ray[serve]"
    )


def test_the_head_serves_replicas_on_the_ray_it_started() -> None:
    ray, serve = head_commands()
    assert ray["head"]
    assert serve.command == "serve"
    assert serve.replicas >= 2
    # `auto`: the Ray that `ray start` just started in this container.
    assert serve.ray_address == "auto"
    assert serve.routing in (None, "residency")  # None: the default, residency
    # Serve's proxy answers through the published port, on the port the healthcheck asks.
    assert ipaddress.ip_address(serve.host).is_unspecified
    assert (
        {serve.port}
        == container_ports("ray-head")
        == {urlsplit(url).port for url in URL.findall(" ".join(compose_healthcheck("ray-head")))}
    )
    # Nothing in the command overrides the placement the nodes share with bank-init.
    assert serve.config is None
    assert serve.bank is None
    assert serve.cloud_endpoint is None
    # hmem, not the shell, is PID 1: `docker stop`'s SIGTERM reaches it.
    script = service("ray-head")["command"][2]
    assert re.search(r"&&\s*exec\s+hmem\s", script), script


def test_every_replica_has_a_node() -> None:
    _, serve = head_commands()
    workers = int(service("ray-worker").get("deploy", {}).get("replicas", 1))
    nodes = 1 + workers
    if serve.max_replicas_per_node is not None:
        # Replicas beyond this never start, and the application never gets ready.
        assert serve.replicas <= nodes * serve.max_replicas_per_node
    # One replica per container, as on separate machines: each its own RAM cache and tiers.
    assert serve.max_replicas_per_node == 1
    assert serve.replicas == nodes


def test_the_worker_joins_the_head() -> None:
    ray, _ = head_commands()
    worker = worker_start()
    assert not worker["head"]
    # --block: in the foreground, so that the container lives as long as the node.
    assert worker["block"]
    host, _, port = str(worker["address"]).rpartition(":")
    assert host == "ray-head"
    assert int(port) == (ray["port"] or 6379)
    assert service("ray-worker")["depends_on"]["ray-head"]["condition"] == "service_started", (
        "the head is ready only once this node has joined: waiting on its health never ends"
    )
    assert service("ray-worker")["restart"] == "unless-stopped"
    # The image's healthcheck asks for the HTTP API, which only the head serves.
    assert service("ray-worker")["healthcheck"] == {"disable": True}


def test_the_head_starts_after_the_bank_is_pushed() -> None:
    head = service("ray-head")
    assert head["depends_on"]["minio"]["condition"] == "service_healthy"
    assert head["depends_on"]["bank-init"]["condition"] == "service_completed_successfully"
    assert head["restart"] == "unless-stopped"


def test_ray_nodes_share_the_hmem_env() -> None:
    # x-hmem-env on both: every replica reads the deepest level from MinIO, where bank-init put
    # it, and each node's boto3 finds the S3 credentials in its own environment.
    pushed = {k: v for k, v in compose_env("bank-init").items() if k.startswith(("HMEM_", "AWS_"))}
    for name in CLUSTER_SERVICES:
        env = compose_env(name)
        assert {k: env.get(k) for k in pushed} == pushed, name
    # Settings are read on the head and shipped: one set elsewhere would be silently ignored.
    worker_settings = {k for k in compose_env("ray-worker") if k.startswith("HMEM_")}
    assert worker_settings <= set(pushed), worker_settings - set(pushed)
    # The head may pass the keys through, like the default server, never fix them.
    head_env = compose_env("ray-head")
    for key in ("HMEM_API_KEYS", "HMEM_ADMIN_KEY"):
        assert head_env.get(key, None) is None, f"{key} has a value in docker-compose.yml"


def test_each_ray_node_keeps_its_own_state() -> None:
    data_dir = str(container_env("ray-head")["HMEM_DATA_DIR"])
    volumes = [mounts(name).get(data_dir) for name in CLUSTER_SERVICES]
    assert all(v in compose()["volumes"] for v in volumes), volumes
    # Replica-local tiers are per machine: one LMDB is never opened from two containers.
    assert len(set(volumes)) == len(volumes)
    assert mounts("hmem")[data_dir] not in volumes


def test_ray_object_store_fits_shared_memory() -> None:
    ray, _ = head_commands()
    for name, options in [("ray-head", ray), ("ray-worker", worker_start())]:
        store = options["object_store_memory"]
        shm = service(name).get("shm_size")
        # Docker's default /dev/shm is 64 MB: Ray would put its store in /tmp instead, slowly.
        assert store is not None, f"{name}: --object-store-memory is not set"
        assert shm is not None, f"{name}: no shm_size"
        assert store <= byte_size(shm), f"{name}: the object store does not fit {shm}"


# --- docs/deploy.md: its commands and settings files ----------------------------------------------


def doc_commands() -> list[list[str]]:
    """The `hmem` and `ray` commands of docs/deploy.md's shell blocks."""
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", deploy_doc(), re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    commands = [c for line in lines if line.strip() for c in shell_commands(line)]
    return [c for c in commands if c[0] in ("hmem", "ray")]


def test_doc_commands_parse() -> None:
    commands = doc_commands()
    replicas = []
    for argv in commands:
        if argv[0] == "hmem":
            args = parse_hmem(argv, "docs/deploy.md")
            if args.command == "serve" and args.replicas is not None:
                replicas.append(args)
        else:
            parse_ray(argv, "docs/deploy.md")
    assert replicas, "docs/deploy.md shows no `hmem serve --replicas`"
    assert any(a.ray_address == "auto" and a.max_replicas_per_node == 1 for a in replicas)
    # Serve's proxy on every interface is the API on the network: the page says keys first.
    assert "HMEM_API_KEYS" in deploy_doc()


def test_doc_settings_files_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in list(os.environ):
        if variable.startswith("HMEM_"):
            monkeypatch.delenv(variable)
    blocks = re.findall(r"```toml\n(.*?)```", deploy_doc(), re.DOTALL)
    assert blocks, "docs/deploy.md shows no settings file"
    for number, block in enumerate(blocks):
        path = tmp_path / f"settings-{number}.toml"
        path.write_text(block)
        load_settings(path)


def test_doc_serve_run_names_the_cluster_application() -> None:
    targets = re.findall(r"\bserve run ([\w.]+):(\w+)", deploy_doc())
    assert targets, "docs/deploy.md shows no `serve run`"
    for module, name in targets:
        path = REPO / Path(*module.split(".")).with_suffix(".py")
        assert path.is_file(), f"`serve run {module}:{name}`: no {path.relative_to(REPO)}"
        tree = ast.parse(path.read_text())
        functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert name in functions, f"{module} defines no function {name}"
