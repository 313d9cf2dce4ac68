"""deploy/k8s/: the Kubernetes manifests, checked without a cluster.

Every manifest (and every overlay's patch, merged into the base as kustomize would) deserialises into the
``kubernetes`` client's typed models with no field the models do not know; container commands go through the
real CLI parsers (node flags with the pod's environment); the router's SRV name is the one Kubernetes gives the
headless Service's named port; resources equal the edge profiles' container limits; probes are the images'
own health checks.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

from faasmoe.node import cli as node_cli
from faasmoe.node.profiles import list_profiles, load_profile
from faasmoe.router.cli import main as router_cli
from faasmoe.router.control.dns_srv import parse_spec
from faasmoe.router.store import split
from test_compose import dockerfile_of

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6, "G": 10**9,
         "g": 1 << 30, "m": 1 << 20}       # the last two: docker's mem_limit units in the profiles


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def kustomization(path: Path) -> dict:
    (doc,) = docs(path / "kustomization.yaml")
    return doc


BASE = kustomization(K8S)
OBJECTS = [obj for name in BASE["resources"] for obj in docs(K8S / name)]


def find(kind: str, name: str, objects=None) -> dict:
    (obj,) = [o for o in (objects or OBJECTS) if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


# --------------------------------------------------------------------------------- typed models, strictly


def model_name(obj: dict) -> str:
    version = obj["apiVersion"].split("/")[-1]
    return version[0].upper() + version[1:] + obj["kind"]


def _strict(data, type_name: str, where: str) -> list[str]:
    """Fields of ``data`` the typed model ``type_name`` does not know (the client would silently drop them)."""
    generic = re.fullmatch(r"(?:List\[|list\[)(.+)\]", type_name)
    if generic:
        return [p for i, item in enumerate(data or []) for p in _strict(item, generic.group(1), f"{where}[{i}]")]
    mapping = re.fullmatch(r"(?:Dict\[str, |dict\(str, )(.+)[\])]", type_name)
    if mapping:
        return [p for key, item in (data or {}).items() for p in _strict(item, mapping.group(1), f"{where}.{key}")]
    klass = getattr(k8s, type_name, None)
    if klass is None or data is None:                # str, int, bool, object (int-or-string), datetime
        return []
    if not isinstance(data, dict):
        return [f"{where}: expected an object ({type_name}), got {data!r}"]
    by_json = {json_key: attr for attr, json_key in klass.attribute_map.items()}
    problems = [f"{where}.{key}: not a field of {type_name}" for key in data if key not in by_json]
    for key, value in data.items():
        if key in by_json:
            problems += _strict(value, klass.openapi_types[by_json[key]], f"{where}.{key}")
    return problems


def deserialise(obj: dict):
    """The typed object (its constructors check required fields); AssertionError listing unknown fields."""
    name = model_name(obj)
    assert hasattr(k8s, name), f"{obj['kind']} {obj['apiVersion']}: no typed model {name}"
    problems = _strict(obj, name, f"{obj['kind']}/{obj['metadata']['name']}")
    assert not problems, "\n".join(problems)
    return k8s.ApiClient()._ApiClient__deserialize(copy.deepcopy(obj), name)


def merge(base, patch):
    """A strategic merge patch as kustomize applies ours: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in patch.items()}}
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i
                                                                  for i in base + patch):
        named = {i["name"]: i for i in base}
        return [merge(named[i["name"]], i) if i["name"] in named else i for i in patch] + \
               [i for i in base if i["name"] not in {p["name"] for p in patch}]
    return patch


OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def overlay_objects(name: str) -> list[dict]:
    overlay = kustomization(K8S / "overlays" / name)
    assert overlay["resources"] == ["../.."], f"{name}: an overlay of the base"
    objects = copy.deepcopy(OBJECTS)
    for entry in overlay["patches"]:
        for patch in docs(K8S / "overlays" / name / entry["path"]):
            target = find(patch["kind"], patch["metadata"]["name"], objects)
            objects[objects.index(target)] = merge(target, patch)
    return objects


@pytest.mark.parametrize("obj", OBJECTS, ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_manifest_deserialises_into_typed_models(obj):
    typed = deserialise(obj)
    assert typed.kind == obj["kind"] and typed.metadata.name == obj["metadata"]["name"]
    if obj["kind"] != "Namespace":
        assert obj["metadata"]["namespace"] == BASE["namespace"] == find("Namespace", BASE["namespace"])["metadata"]["name"]


def test_a_stray_field_is_caught():
    bad = copy.deepcopy(find("StatefulSet", "faasmoe-node"))
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"memory": "1Gi"}}
    with pytest.raises(AssertionError, match="resource: not a field of V1Container"):
        deserialise(bad)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_deserialises(name):
    assert name in list_profiles(), f"overlay {name} is not a shipped profile"
    deserialise(find("StatefulSet", "faasmoe-node", overlay_objects(name)))


def test_secrets_come_from_files_the_pods_name():
    generated = {g["name"]: g for g in BASE["secretGenerator"]}
    for entry in generated.values():
        deserialise({"apiVersion": "v1", "kind": "Secret", "type": entry["type"],
                     "metadata": {"name": entry["name"], "namespace": BASE["namespace"]}})
        for item in entry["files"]:
            assert item.split("=")[-1].startswith("secrets/"), f"{entry['name']}: {item} outside the git-ignored secrets/"
    assert "secrets/" in (K8S / ".gitignore").read_text().split()
    mounted = {v["secret"]["secretName"] for o in OBJECTS if o["kind"] in ("Deployment", "StatefulSet", "Job")
               for v in o["spec"]["template"]["spec"].get("volumes", []) if "secret" in v}
    assert mounted == set(generated), f"pods mount {mounted}, the generator makes {set(generated)}"
    node_volumes = find("StatefulSet", "faasmoe-node")["spec"]["template"]["spec"]["volumes"]
    assert {v["secret"]["secretName"] for v in node_volumes if "secret" in v} == {"faasmoe-join"}, \
        "nodes must see the join token only, never the CA"


# ------------------------------------------------------------------------------------------ flags in sync


def pod(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str) -> dict:
    (c,) = [c for c in pod(obj)["containers"] if c["name"] == name]
    return c


def node_environment(c: dict, pod_name: str) -> dict[str, str]:
    env = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", item
            env[item["name"]] = pod_name
    return env


def byte_value(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", text).groups()
    return int(number) * UNITS.get(unit, 1)


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_node_pods(variant):
    objects = OBJECTS if variant == "base" else overlay_objects(variant)
    sts, svc = find("StatefulSet", "faasmoe-node", objects), find("Service", "faasmoe-nodes", objects)
    c = container(sts, "node")
    env = node_environment(c, f"{sts['metadata']['name']}-0")
    for var in env:
        flag = "--" + var[len(node_cli.ENV_PREFIX):].lower().replace("_", "-")
        assert flag in {o for a in node_cli.build_parser()._actions for o in a.option_strings}, f"{var}: no {flag}"
    try:
        config = node_cli.config_from_args(c["args"], environ=env)[0]
    except SystemExit as exc:
        pytest.fail(f"faasmoe-node {c['args']} is rejected ({exc})")
    assert config.node_id == "faasmoe-node-0" and config.host == "0.0.0.0" and not config.mdns
    assert env["FAASMOE_NODE_JOIN"].startswith("@/") and "--insecure" not in c["args"], "nodes enrol (mutual TLS)"
    (grpc,) = [p for p in c["ports"] if p["name"] == "grpc"]
    assert config.port == grpc["containerPort"], "FAASMOE_NODE_PORT (the healthcheck reads it) != the gRPC port"
    assert config.metrics_port == next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert str(config.store_dir) in mounts and mounts[str(config.store_dir)]["name"] in \
        {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}, "the store is a per-pod volume"
    token_dir = str(Path(env["FAASMOE_NODE_JOIN"][1:]).parent)
    assert mounts[token_dir].get("readOnly"), "the join token's folder is a read-only mount"

    profile = load_profile(config.profile)
    assert variant in ("base", profile.name), f"overlay {variant} runs profile {profile.name}"
    for side in ("requests", "limits"):
        res = c["resources"][side]
        assert byte_value(res["memory"]) == byte_value(profile.container_mem_limit), f"{side}.memory vs profile"
        assert float(res["cpu"]) == profile.container_cpus, f"{side}.cpu vs profile {profile.name}"

    _, dockerfile = dockerfile_of("node")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"] == dockerfile.healthcheck_cmd(), f"{probe}: not the image's healthcheck"
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "grpc" and port["targetPort"] in ("grpc", grpc["containerPort"])
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


def router_args(argv: list[str], monkeypatch) -> argparse.Namespace:
    for var in [v for v in os.environ if v.startswith(router_cli.ENV_PREFIX)]:
        monkeypatch.delenv(var)
    try:
        return router_cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"faasmoe-router {argv} is rejected (exit {exc.code})")


def test_router_finds_the_nodes_service_over_srv(monkeypatch):
    deploy = find("Deployment", "faasmoe-router")
    c = container(deploy, "router")
    args = router_args(c["args"], monkeypatch)
    assert args.command == "serve" and args.host == "0.0.0.0" and args.cluster and args.tenants
    spec = parse_spec(args.discover)
    svc = find("Service", "faasmoe-nodes")
    (port,) = svc["spec"]["ports"]
    assert spec.name == f"_{port['name']}._tcp.{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local."
    assert spec.nameserver is None, "in a pod, the cluster's resolver"

    assert args.port == next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod(deploy)["volumes"]}
    assert volumes[mounts[args.cluster]["name"]].get("persistentVolumeClaim"), "enrolments need a writable volume"
    assert volumes[mounts[str(Path(args.tenants).parent)]["name"]]["secret"]["secretName"] == "faasmoe-tenants"

    job = find("Job", "faasmoe-split")
    (sc,) = pod(job)["containers"]
    assert sc["command"] == ["faasmoe"] and sc["args"][0] == "split"
    parser = argparse.ArgumentParser(prog="faasmoe split")
    split.add_arguments(parser)
    split_args = parser.parse_args(sc["args"][1:])
    assert Path(args.store) == split_args.out, "the router serves what the Job writes"
    store_root = next(m for m in c["volumeMounts"] if Path(args.store).is_relative_to(m["mountPath"]))
    job_root = next(m for m in sc["volumeMounts"] if split_args.out.is_relative_to(m["mountPath"]))
    job_volumes = {v["name"]: v for v in pod(job)["volumes"]}
    assert volumes[store_root["name"]]["persistentVolumeClaim"]["claimName"] == \
        job_volumes[job_root["name"]]["persistentVolumeClaim"]["claimName"]
    assert store_root.get("readOnly") and not job_root.get("readOnly")
    model_mount = next(m for m in sc["volumeMounts"] if m["mountPath"] == str(split_args.model_dir))
    assert model_mount.get("readOnly")

    init = " ".join(pod(deploy)["initContainers"][0]["args"])
    assert f"{args.store}/manifest.json" in init, "the router waits for the split Job's store"

    rsvc = find("Service", "faasmoe-router")      # the API, and enrolment at the address the join tokens name
    assert {p["name"] for p in rsvc["spec"]["ports"]} == {"http", "enroll"}
    assert next(p["port"] for p in rsvc["spec"]["ports"] if p["name"] == "enroll") == 8443
    assert rsvc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
