"""compose/: the docker compose emulation, checked without a docker engine.

Every container command goes through the real CLI parser of its entrypoint (node commands further through
``config_from_args`` with the image's and the service's environment), node limits are compared with the
edge profiles, and the Dockerfiles are read for what a build would need (COPY sources, the packages each
image installs). The node image's healthcheck one-liner runs against a real node process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from faasmoe.node import cli as node_cli
from faasmoe.node.profiles import list_profiles, load_profile
from faasmoe.proto.errors import ConfigError
from faasmoe.router.cli import main as router_cli
from faasmoe.router.store import split

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
NETWORK = "mesh"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# ---------------------------------------------------------------------------------------------- helpers

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, environ: dict[str, str]):
    """Compose-style ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR`` and ``$$`` in every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, environ) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, environ) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op == ":-":
            return environ.get(name) or default
        if op == "-":
            return environ.get(name, default)
        if op in (":?", "?") and not environ.get(name):
            raise AssertionError(f"${{{name}}} is required but has no value")
        return environ.get(name, "")

    return _VAR.sub(one, value)


RAW = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
COMPOSE = interpolate(RAW, {})          # as shipped: no .env, no exported variables
SERVICES: dict[str, dict] = COMPOSE["services"]


def build_of(service: dict) -> tuple[Path, Path] | None:
    """(context dir, Dockerfile) of a service that builds its image, else None."""
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        build = {"context": build}
    context = (COMPOSE_DIR / build.get("context", ".")).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def image_kind(service: dict) -> str | None:
    """"node" / "router" for services running one of our images, None for third-party images."""
    built = build_of(service)
    image = str(service.get("image", ""))
    kinds = {kind for kind in ("node", "router")
             if image.startswith(f"faasmoe-{kind}") or (built and built[1].name == f"Dockerfile.{kind}")}
    assert len(kinds) <= 1, f"image {image!r} and its build disagree: {service.get('build')}"
    return kinds.pop() if kinds else None


def services_of(kind: str) -> list[str]:
    return sorted(name for name, service in SERVICES.items() if image_kind(service) == kind)


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def command(name: str) -> list[str]:
    cmd = SERVICES[name].get("command")
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), \
        f"{name}: command must be a list of strings (exec form), got {cmd!r}"
    return cmd


def mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of every volume entry (short and long syntax)."""
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            parts = entry.split(":")
            out.append((parts[0], parts[1], "ro" in parts[2:]))
        else:
            out.append((entry.get("source", ""), entry["target"], bool(entry.get("read_only"))))
    return out


def is_named(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


# --------------------------------------------------------------------------------------- Dockerfiles


class Dockerfile:
    """Instructions of a Dockerfile (continuations joined, comments dropped)."""

    def __init__(self, path: Path):
        self.path = path
        self.instructions: list[tuple[str, str]] = []
        pending = ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip().startswith("#") or not line.strip():
                continue
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            keyword, _, rest = pending.strip().partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))
            pending = ""
        assert not pending, f"{path}: dangling line continuation"

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM"]
        return self.instructions[starts[-1]:]

    def env(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ENV"):
            for item in shlex.split(rest):
                key, sep, value = item.partition("=")
                assert sep, f"{self.path.name}: use ENV KEY=VALUE, got {rest!r}"
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        (rest,) = [r for kw, r in self.final_stage() if kw == keyword]
        return json.loads(rest)

    def copies(self) -> list[list[str]]:
        """Source paths of every COPY/ADD from the build context (not from another stage)."""
        out = []
        for kw, rest in self.instructions:
            if kw not in ("COPY", "ADD"):
                continue
            args = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            flags = [a for a in args if a.startswith("--")]
            if any(f.startswith("--from") for f in flags):
                continue
            paths = [a for a in args if not a.startswith("--")]
            assert len(paths) >= 2, f"{self.path.name}: {kw} {rest!r} needs a source and a destination"
            out.append(paths[:-1])
        return out

    def healthcheck_cmd(self) -> list[str]:
        (rest,) = self.all("HEALTHCHECK")
        _, sep, cmd = rest.partition("CMD ")
        assert sep and cmd.strip().startswith("["), f"{self.path.name}: HEALTHCHECK needs CMD in exec form"
        return json.loads(cmd)


def dockerfile_of(kind: str) -> tuple[Path, Dockerfile]:
    """The build context and Dockerfile every service of this image kind uses (all the same)."""
    builds = {build_of(SERVICES[name]) for name in services_of(kind)} - {None}
    assert len(builds) == 1, f"{kind} services must share one build, got {builds}"
    context, path = builds.pop()
    assert path.is_file(), f"{path} does not exist"
    return context, Dockerfile(path)


def shell_words(dockerfile: Dockerfile, stage_only: bool = False) -> str:
    items = dockerfile.final_stage() if stage_only else dockerfile.instructions
    return " ".join(rest for kw, rest in items if kw == "RUN")


# ------------------------------------------------------------------------------------------ topology


def test_services_networks_and_dependencies():
    assert len(services_of("node")) >= 3
    assert {"broker", "split", "router", "generate"} <= set(SERVICES)
    network = COMPOSE["networks"][NETWORK]
    assert (network or {}).get("driver", "bridge") == "bridge" and not (network or {}).get("external")
    for name, service in SERVICES.items():
        assert "network_mode" not in service, f"{name}: must join the {NETWORK} network, not use network_mode"
        networks = service.get("networks")
        assert networks and NETWORK in networks, f"{name}: not on the user-defined network {NETWORK!r}"
        depends = service.get("depends_on") or {}
        for target, spec in (depends.items() if isinstance(depends, dict) else ((t, {}) for t in depends)):
            assert target in SERVICES, f"{name}: depends_on unknown service {target!r}"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in CONDITIONS, f"{name}: unknown condition {condition!r}"
            if condition == "service_healthy":
                assert image_kind(SERVICES[target]) == "node", f"{name}: {target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert SERVICES[target].get("restart") == "no", f"{name}: {target} must be a one-shot"
            if not service.get("profiles"):
                assert not SERVICES[target].get("profiles"), \
                    f"{name} starts by default but depends on {target}, which only runs with a profile"


def test_networks_are_ours_and_closed():
    """The mesh network is internal (no route off the machine) on a fixed subnet inside 10.231.0.0/16, the range
    the tests own; only the router also joins "api" (no NAT), to publish its port on loopback only."""
    owned = ipaddress.ip_network("10.231.0.0/16")
    for name, network in COMPOSE["networks"].items():
        (pool,) = network["ipam"]["config"]
        assert ipaddress.ip_network(pool["subnet"]).subnet_of(owned), f"{name}: {pool['subnet']} outside {owned}"
    assert COMPOSE["networks"][NETWORK]["internal"] is True
    api = COMPOSE["networks"]["api"]
    assert api["driver_opts"]["com.docker.network.bridge.enable_ip_masquerade"] == "false"
    assert [n for n, svc in SERVICES.items() if "api" in svc["networks"]] == ["router"]
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} published beyond loopback"
    assert [n for n, svc in SERVICES.items() if svc.get("ports")] == ["router"]


def test_volumes_are_declared_and_bind_sources_exist():
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for source, target, _ in mounts(service):
            if is_named(source):
                assert source in declared, f"{name}: volume {source!r} is not declared under volumes:"
            elif target != "/models/qwen2moe":     # the model is the user's; every other bind mount ships
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind mount source {source} does not exist"


def test_broker():
    broker = SERVICES["broker"]
    assert broker["image"].startswith("faasmoe-broker"), "Debian's mosquitto, built here: no registry needed"
    dockerfile = Dockerfile(COMPOSE_DIR / broker["build"]["context"] / "Dockerfile")
    assert "apt-get install" in shell_words(dockerfile) and "mosquitto" in shell_words(dockerfile)
    assert dockerfile.all("FROM") == ["${BASE}"] and "BASE" in broker["build"]["args"]
    assert [u for kw, u in dockerfile.final_stage() if kw == "USER"] == ["mosquitto"]
    (config,) = [(COMPOSE_DIR / s) for s, t, ro in mounts(broker) if t == "/mosquitto/config/mosquitto.conf" and ro]
    lines = {" ".join(line.split()) for line in config.read_text().splitlines() if not line.startswith("#")}
    assert {"listener 1883", "allow_anonymous true"} <= lines
    assert "ports" not in broker, "the anonymous broker must stay inside the compose network"


# --------------------------------------------------------------------------------------------- nodes


def node_environment(name: str) -> dict[str, str]:
    """What the node process sees: the image's ENV, then the service's environment."""
    _, dockerfile = dockerfile_of("node")
    return dockerfile.env() | environment(SERVICES[name])


def node_flags() -> set[str]:
    return {opt for action in node_cli.build_parser()._actions for opt in action.option_strings}


def parse_node(argv: list[str], environ: dict[str, str], what: str):
    try:
        node_cli.build_parser().parse_args(argv)
        return node_cli.config_from_args(argv, environ=environ)[0]
    except (ConfigError, SystemExit) as exc:
        pytest.fail(f"{what}: faasmoe-node {shlex.join(argv)} is rejected: {exc}")


@pytest.mark.parametrize("name", services_of("node"))
def test_node_service(name):
    service, argv, env = SERVICES[name], command(name), node_environment(name)
    assert "entrypoint" not in service, f"{name}: runs the image's faasmoe-node entrypoint"
    flags = node_flags()
    for var in env:
        if var.startswith(node_cli.ENV_PREFIX):
            flag = "--" + var[len(node_cli.ENV_PREFIX):].lower().replace("_", "-")
            assert flag in flags, f"{name}: {var} is not a faasmoe-node flag ({flag})"
    config = parse_node(argv, env, name)

    assert config.host == "0.0.0.0", f"{name}: must listen on every interface to be reachable"
    assert "--port" not in argv and config.port == int(env["FAASMOE_NODE_PORT"]) > 0, \
        f"{name}: give a fixed port as FAASMOE_NODE_PORT (the healthcheck reads it)"
    assert not config.mdns, f"{name}: the internal network drops multicast; the router lists the nodes (x-nodes)"
    assert config.mqtt_url and config.mqtt_url.startswith("mqtt://broker:"), f"{name}: MQTT goes to the broker"
    assert config.metrics_port, f"{name}: no metrics port"
    named = {target: source for source, target, ro in mounts(service) if is_named(source) and not ro}
    assert str(config.store_dir) in named, f"{name}: store dir {config.store_dir} is not on a named volume"

    assert config.profile in list_profiles(), f"{name}: --profile {config.profile!r} is not a shipped profile"
    profile = load_profile(config.profile)
    assert "deploy" not in service, f"{name}: limits are service-level mem_limit/cpu_quota, not deploy.resources"
    assert str(service.get("mem_limit")).lower() == profile.container_mem_limit.lower(), \
        f"{name}: mem_limit {service.get('mem_limit')!r} != profile {profile.name} {profile.container_mem_limit!r}"
    # A quota per period, not "cpus" (docker refuses cpus above the host's core count; the quota it takes)
    assert "cpus" not in service, f"{name}: give the CPU limit as cpu_quota / cpu_period"
    assert service["cpu_quota"] / service["cpu_period"] == profile.container_cpus, \
        f"{name}: cpu_quota/cpu_period {service['cpu_quota']}/{service['cpu_period']} != profile {profile.name} " \
        f"{profile.container_cpus}"


def test_nodes_are_distinct():
    names = services_of("node")
    configs = [parse_node(command(n), node_environment(n), n) for n in names]
    assert len({c.node_id for c in configs}) == len(names), "node ids must be unique"
    volumes = [s for n in names for s, t, _ in mounts(SERVICES[n]) if is_named(s) and t == "/var/lib/faasmoe/store"]
    assert len(set(volumes)) == len(volumes) == len(names), "one store volume per node"
    assert len({c.profile for c in configs}) >= 3, "emulate at least three different devices"


def test_the_mesh_is_enrolled():
    """cluster writes the CA to a volume only router-image services mount, and a join token to one the nodes
    mount read-only; nodes join with @that file; the router serves enrolment at the token's address."""
    init = command("cluster")
    assert init[0] == "init-cluster" and "--if-missing" in init
    token_file = init[init.index("--token-file") + 1]
    cluster_dir = init[init.index("--dir") + 1]
    assert init[init.index("--enroll-address") + 1] == "router:8443"
    assert "--cluster" in command("router") and command("router")[command("router").index("--cluster") + 1] == cluster_dir
    cluster_volume = next(src for src, target, _ in mounts(SERVICES["cluster"]) if target == cluster_dir)
    for name in services_of("node"):
        env = node_environment(name)
        assert env.get("FAASMOE_NODE_JOIN") == "@" + token_file, name
        sources = {src: (target, mode) for src, target, mode in mounts(SERVICES[name])}
        assert cluster_volume not in sources, f"{name} must not see the cluster CA's key"
        assert any(token_file.startswith(target + "/") and read_only for target, read_only in sources.values()), name
        assert "--insecure" not in command(name)
        assert (SERVICES[name].get("depends_on") or {}).get("router"), f"{name}: enrolment needs the router"


def test_a_bad_node_command_is_caught():
    """The checks above would notice a typo: the parser refuses it instead of exiting the test run."""
    with pytest.raises(pytest.fail.Exception):
        parse_node(["--profle", "rpi4-4gb"], {}, "typo")
    with pytest.raises(pytest.fail.Exception):
        parse_node(["--profile", "rpi9"], {}, "unknown profile")


# -------------------------------------------------------------------------------------------- router


def router_args(name: str, monkeypatch) -> argparse.Namespace:
    """Parse a router-image service's command with the CLI its entrypoint runs, under its environment."""
    service, argv = SERVICES[name], command(name)
    env = environment(service)
    for var in [v for v in os.environ if v.startswith(router_cli.ENV_PREFIX)]:
        monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    entrypoint = service.get("entrypoint")
    try:
        if entrypoint is None:                         # the image's faasmoe-router
            return router_cli.build_parser().parse_args(argv)
        assert entrypoint == ["faasmoe"] and argv[0] == "split", f"{name}: only 'faasmoe split' is expected"
        parser = argparse.ArgumentParser(prog="faasmoe split")
        split.add_arguments(parser)
        return parser.parse_args(argv[1:])
    except SystemExit as exc:
        pytest.fail(f"{name}: {shlex.join(argv)} is rejected by the CLI parser (exit {exc.code})")


def router_flag_default(subcommand: str, flag: str):
    """Default of a faasmoe-router subcommand's flag, for a parser built under the current environment."""
    parser = router_cli.build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    actions = [a for a in subparsers.choices[subcommand]._actions if flag in a.option_strings]
    return actions[0].default if actions else KeyError(flag)


@pytest.mark.parametrize("name", services_of("router"))
def test_router_service_parses(name, monkeypatch):
    args = router_args(name, monkeypatch)
    for var, value in environment(SERVICES[name]).items():
        if not var.startswith(router_cli.ENV_PREFIX):
            continue
        assert args.command in ("generate", "place", "serve", "status"), f"{name}: {var} is for faasmoe-router"
        flag = "--" + var[len(router_cli.ENV_PREFIX):].lower().replace("_", "-")
        with_env = router_flag_default(args.command, flag)
        assert not isinstance(with_env, KeyError), f"{name}: {var}: faasmoe-router {args.command} has no {flag}"
        monkeypatch.delenv(var)
        assert with_env != router_flag_default(args.command, flag), \
            f"{name}: faasmoe-router {args.command} does not read {flag} from {var}"
        monkeypatch.setenv(var, value)


def test_split_router_generate_agree(monkeypatch):
    split_args = router_args("split", monkeypatch)
    serve = router_args("router", monkeypatch)
    gen = router_args("generate", monkeypatch)
    assert serve.command == "serve" and gen.command == "generate"

    model = str(split_args.model_dir)
    assert [ro for _, t, ro in mounts(SERVICES["split"]) if t == model] == [True], \
        "split reads the model from one read-only mount"
    raw = [v for v in RAW["services"]["split"]["volumes"] if isinstance(v, str) and f":{model}:" in v]
    assert raw and raw[0].startswith("${FAASMOE_MODEL_DIR:-"), "the model dir comes from FAASMOE_MODEL_DIR"

    store = split_args.out
    assert Path(serve.store) == Path(gen.store) == store, "split --out, router --store and generate --store differ"
    for name, writable in (("split", True), ("router", False), ("generate", False)):
        (volume,) = [(s, ro) for s, t, ro in mounts(SERVICES[name]) if store.is_relative_to(t) and is_named(s)]
        assert volume == ("store", not writable), f"{name}: store volume mount {volume}"

    # mDNS cannot cross an internal docker network (multicast is dropped), so the router lists every node service
    listed = {f"{name}:{node_environment(name)['FAASMOE_NODE_PORT']}" for name in services_of("node")}
    assert not serve.discover and not gen.discover
    assert set(serve.nodes.split(",")) == set(gen.nodes.split(",")) == listed, "--nodes must list every node service"
    assert serve.mqtt.startswith("mqtt://broker:") and serve.port and serve.host == "0.0.0.0"
    assert serve.tenants, "a router on 0.0.0.0 needs a tenants file (it refuses to start without one)"
    assert any(Path(serve.tenants).parent == Path(t) and ro for _, t, ro in mounts(SERVICES["router"])), \
        "the tenants file's folder is not mounted (a file mount would pin the old file when the CLI rewrites it)"
    published = [str(p) for p in SERVICES["router"].get("ports", [])]
    assert any(p.endswith(f":{serve.port}") for p in published), "router API port not published"
    assert SERVICES["router"]["depends_on"]["split"]["condition"] == "service_completed_successfully"

    assert SERVICES["generate"].get("profiles") == ["tools"], "generate only runs when asked"
    assert gen.max_new_tokens == 32 and all(p.strip() for p in gen.prompt)
    assert SERVICES["split"].get("profiles") is None and SERVICES["split"]["restart"] == "no"


# ---------------------------------------------------------------------------------------- Dockerfiles


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("kind", ["node", "router"])
def test_dockerfile_copies_what_the_build_needs(kind):
    context, dockerfile = dockerfile_of(kind)
    assert context == REPO, f"{kind}: build from the repository root"
    sources = [src for group in dockerfile.copies() for src in group]
    for src in sources:
        if src.startswith("compose/local/") and "*" in src:
            continue            # made by compose/build-images when this machine has it (a glob may match nothing)
        assert list(context.glob(src.rstrip("/"))), f"{dockerfile.path.name}: COPY source {src!r} does not exist"
    copied = {src.rstrip("/") for src in sources}
    meta = pyproject()
    needed = {"pyproject.toml", *meta["tool"]["setuptools"]["package-dir"].values()}
    if isinstance(meta["project"].get("readme"), str):
        needed.add(meta["project"]["readme"])
    assert needed <= copied, f"{dockerfile.path.name}: 'pip install .' also needs {sorted(needed - copied)}"
    # The base is a build argument (a local Debian image without a registry), the registry's by default.
    assert dockerfile.instructions[0] == ("ARG", "BASE=python:3.11-slim")
    assert [f.split()[0] for f in dockerfile.all("FROM")] == ["${BASE}", "${BASE}"]
    for name in services_of(kind):
        assert SERVICES[name]["build"]["args"]["BASE"] == "python:3.11-slim", f"{name}: default base"
    assert RAW["services"][services_of(kind)[0]]["build"]["args"]["BASE"].startswith("${FAASMOE_BASE_IMAGE:-")
    users = [rest for kw, rest in dockerfile.final_stage() if kw == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile.path.name}: run as a non-root user"


def test_node_image_has_no_router_dependencies():
    _, dockerfile = dockerfile_of("node")
    runs = shell_words(dockerfile)
    assert '"/src[node]"' in runs, "the node image installs .[node]"
    for banned in ("torch", "transformers", "[router]", "[all]", "[dev]"):
        assert banned not in runs, f"Dockerfile.node installs {banned!r}"
    assert not set(pyproject()["project"]["optional-dependencies"]["node"]) & {"torch", "transformers"}
    assert dockerfile.exec_form("ENTRYPOINT") == ["faasmoe-node"]
    store_dir = dockerfile.env()["FAASMOE_NODE_STORE_DIR"]
    assert store_dir in " ".join(dockerfile.all("VOLUME")), "the node's store dir is a volume"


def test_router_image_installs_cpu_torch_first():
    _, dockerfile = dockerfile_of("router")
    runs = shell_words(dockerfile)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile.all("ARG"), "the CPU index by default"
    assert 0 <= runs.index('"$TORCH_SPEC"') < runs.index('"/src[all]"'), "install the CPU torch wheel before .[all]"
    assert "--find-links /tmp/faasmoe-local/wheels" in runs, "the wheels compose/build-images brought along"
    assert dockerfile.exec_form("ENTRYPOINT") == ["faasmoe-router"]


# -------------------------------------------------------------------------------------- healthcheck


def test_node_healthcheck_against_a_real_node(tmp_path):
    """The image's healthcheck, run as the image runs it, against a plaintext node and an enrolled (mutual TLS)
    node joined with a token file, as in compose; and against nothing."""
    from faasmoe.router.control.cluster import Cluster
    from faasmoe.router.control.enroll_server import EnrollThread
    from node_fixtures import NodeProcess, node_env

    _, dockerfile = dockerfile_of("node")
    cmd = dockerfile.healthcheck_cmd()
    assert cmd == ["python", "-m", "faasmoe.node.healthcheck"]

    def check(port: int, store: Path) -> int:
        return subprocess.run([sys.executable, *cmd[1:]], capture_output=True, timeout=30,
                              env=node_env(FAASMOE_NODE_PORT=str(port), FAASMOE_NODE_STORE_DIR=str(store))).returncode

    def args(store: Path, *extra: str) -> list[str]:
        return ["--port", "0", "--store-dir", str(store), "--no-mdns", "--threads", "1", "--memory-budget-mb", "64",
                "--node-id", "hc", *extra]

    plain = tmp_path / "plain"
    with NodeProcess(*args(plain), env=node_env()) as node:
        port = int(node.address.rsplit(":", 1)[1])
        assert check(port, plain) == 0, "healthcheck fails against a serving node"
        assert node.stop() == 0
    assert check(port, plain) != 0, "healthcheck passes with no node listening"

    cluster = Cluster.init(tmp_path / "cluster", "127.0.0.1:1")
    with EnrollThread(cluster) as server:
        cluster.set_address(f"127.0.0.1:{server.port}")
        token_file = tmp_path / "join" / "token"
        token_file.parent.mkdir()
        token_file.write_text(cluster.create_token(600).encode() + "\n")
        enrolled = tmp_path / "enrolled"
        with NodeProcess(*args(enrolled), env=node_env(FAASMOE_NODE_JOIN=f"@{token_file}")) as node:
            assert node.ready["tls"]
            port = int(node.address.rsplit(":", 1)[1])
            assert check(port, enrolled) == 0, "healthcheck fails against an enrolled node"
            assert check(port, plain) != 0, "a plaintext check passes against a mutual-TLS node"


# ------------------------------------------------------------------------------- building without a registry


def test_build_scripts_hold_nothing_of_this_machine():
    """The mirror, the package indexes and the local wheels are read at build time (apt's sources, pip's own
    configuration), never written into the repository."""
    files = [p for p in (COMPOSE_DIR.rglob("*")) if p.is_file() and "local" not in p.relative_to(COMPOSE_DIR).parts]
    files += list((REPO / "deploy").rglob("*.yaml")) + [REPO / ".ci" / "run"]
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for banned in ("deb.debian.org", "security.debian.org", "/opt/wheels", "/opt/pypi", "file://", "/etc/xdg",
                       "/work/", "pypi.org"):
            assert banned not in text, f"{path.relative_to(REPO)} names {banned!r}: read it at build time instead"
    base = (COMPOSE_DIR / "base" / "build.sh").read_text()
    assert "apt-get indextargets" in base and "VERSION_CODENAME" in base, "mirror and release from this machine"
    assert "pip config list" in (COMPOSE_DIR / "base" / "pip_context.py").read_text().replace('", "', " ")
    assert (REPO / ".gitignore").read_text().count("/compose/local/*") == 1
