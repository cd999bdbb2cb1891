"""The Kubernetes manifests render, validate offline and agree with the code they deploy.

Overlays are rendered by ``kustomize_subset`` (no kustomize binary here), built-in objects are
validated with ``kubernetes-validate`` against the oldest and newest Kubernetes versions we
support, KEDA and Prometheus Operator objects against the CRD-derived schemas in ``schemas/``.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from rq import Queue

from ham_core.config import Settings
from ham_core.models import queue_name
from tests.deploy.kustomize_subset import Doc, UnsupportedKustomization, render, split_image

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = Path(__file__).parent / "schemas"
OVERLAYS = ("dev", "prod")
# Oldest supported (pod lifecycle `sleep` action is on by default from 1.30) and newest known.
K8S_VERSIONS = ("1.30.0", "1.37.0")
CRD_SCHEMAS = {
    "ScaledObject": "keda-scaledobject.json",
    "TriggerAuthentication": "keda-triggerauthentication.json",
    "ServiceMonitor": "servicemonitor.json",
    "PrometheusRule": "prometheusrule.json",
}
SETTINGS_ENV = {f"HAM_{name.upper()}" for name in Settings.model_fields}
# Keys of `ham-secrets` the manifests read; the prod Secret is created by hand from docs/deploy.md.
SECRET_KEYS = {
    "HAM_REDIS_URL",
    "HAM_API_KEYS",
    "HAM_URL_SIGNING_KEY",
    "HAM_WEBHOOK_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "REDIS_ADDRESS",
    "REDIS_PASSWORD",
}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / "overlays" / request.param)


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def containers(doc: Doc) -> list[Doc]:
    return doc["spec"]["template"]["spec"]["containers"]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def config_data(docs: list[Doc]) -> dict[str, str]:
    return one(docs, "ConfigMap", "ham-config")["data"]


def secret_data(docs: list[Doc]) -> dict[str, str]:
    secret = one(docs, "Secret", "ham-secrets")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- schema validation -----------------------------------------------------------------------


def test_every_rendered_object_validates_against_kubernetes_or_crd_schema(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    assert docs, f"overlay {name} rendered nothing"
    for doc in docs:
        label = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_SCHEMAS:
            schema = json.loads((SCHEMAS / CRD_SCHEMAS[doc["kind"]]).read_text())
            errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
            assert not errors, f"{label}: {errors}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{label} invalid for Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_crd_schemas_reject_a_misspelt_field() -> None:
    """The hand-written CRD schemas are strict enough to catch a typo the API server would prune."""
    docs = render(K8S / "overlays" / "prod")
    scaled = json.loads(json.dumps(one(docs, "ScaledObject", "ham-worker")))
    scaled["spec"]["maxReplicas"] = 3  # the HPA spelling, not KEDA's maxReplicaCount
    schema = json.loads((SCHEMAS / CRD_SCHEMAS["ScaledObject"]).read_text())
    assert not jsonschema.Draft202012Validator(schema).is_valid(scaled)
    scaled = json.loads(json.dumps(one(docs, "ScaledObject", "ham-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 2  # KEDA metadata values are strings
    assert not jsonschema.Draft202012Validator(schema).is_valid(scaled)


def test_overlays_render_the_expected_objects() -> None:
    kinds = {name: sorted(f"{d['kind']}/{d['metadata']['name']}" for d in render(K8S / "overlays" / name))
             for name in OVERLAYS}
    shared = {
        "ConfigMap/ham-config",
        "Deployment/ham-api",
        "Service/ham-api",
        "HorizontalPodAutoscaler/ham-api",
        "PodDisruptionBudget/ham-api",
        "PodDisruptionBudget/ham-worker",
        "Deployment/ham-worker",
        "Service/ham-worker-metrics",
        "ScaledObject/ham-worker",
        "TriggerAuthentication/ham-redis",
        "ServiceMonitor/ham-api",
        "ServiceMonitor/ham-worker",
        "PrometheusRule/ham",
        "ConfigMap/ham-grafana-dashboard",
        "NetworkPolicy/ham-redis",
        "NetworkPolicy/ham-worker",
    }
    assert set(kinds["dev"]) == shared | {"StatefulSet/redis", "Service/redis", "StatefulSet/s3", "Service/s3",
                                          "Secret/ham-secrets"}
    # prod: no in-cluster Redis/S3, the Secret is created out of band, the model volume is shared;
    # a second worker pool (SDXL) from the worker-pool component, with its own queue and volume.
    assert set(kinds["prod"]) == shared | {"PersistentVolumeClaim/ham-models", "Deployment/ham-worker-sdxl",
                                           "ScaledObject/ham-worker-sdxl", "PersistentVolumeClaim/ham-models-sdxl"}


def test_overlay_namespaces_apply_to_every_object() -> None:
    for name, namespace in (("dev", "ham-dev"), ("prod", "ham")):
        assert {d["metadata"].get("namespace") for d in render(K8S / "overlays" / name)} == {namespace}


@pytest.mark.parametrize("name", OVERLAYS)
def test_renderer_output_equals_kubectl_kustomize(name: str) -> None:
    """Where the real kustomize exists (kubectl's built-in one), the subset renderer agrees exactly."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the subset renderer alone is checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / name)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    by_id = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "overlays" / name)}
    assert set(ours) == set(by_id)
    for key, doc in ours.items():
        assert doc == by_id[key], key


def test_renderer_refuses_kustomize_features_outside_the_tested_subset(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas:\n  - name: ham-api\n    count: 3\n")
    with pytest.raises(UnsupportedKustomization, match="replicas"):
        render(tmp_path)


# --- agreement with the code -------------------------------------------------------------------


def test_every_ham_variable_in_the_manifests_is_a_settings_field(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    seen: set[str] = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            seen |= set(doc["data"])
        if doc["kind"] == "Secret":
            seen |= set(doc["data"])
        for workload in workloads([doc]):
            for container in containers(workload):
                seen |= {e["name"] for e in container.get("env", [])}
    ham = {v for v in seen if v.startswith("HAM_")}
    assert ham, "no HAM_ variables found: the test is not looking at the right objects"
    assert ham <= SETTINGS_ENV, f"{name}: not Settings fields: {sorted(ham - SETTINGS_ENV)}"


def test_config_and_secrets_build_valid_settings(overlay: tuple[str, list[Doc]]) -> None:
    """The values, not just the names: what a pod would read parses into Settings."""
    name, docs = overlay
    env = dict(config_data(docs))
    if name == "dev":
        env |= {k: v for k, v in secret_data(docs).items() if k.startswith("HAM_")}
    worker = one(docs, "Deployment", "ham-worker")
    env |= {e["name"]: e["value"] for e in containers(worker)[0]["env"]
            if e["name"].startswith("HAM_") and "value" in e}
    settings = Settings(**{k.removeprefix("HAM_").lower(): v for k, v in env.items()})
    assert settings.queue_name == "ham"
    assert settings.job_timeout == int(env["HAM_JOB_TIMEOUT"])
    if name == "dev":
        assert settings.model == "tiny"
        assert settings.device == "cpu"
        assert settings.auth_enabled
    else:
        assert settings.device == "cuda"


def test_keda_scales_on_the_rq_list_of_the_configured_queue(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    trigger = one(docs, "ScaledObject", "ham-worker")["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    queue = config_data(docs)["HAM_QUEUE_NAME"]
    assert queue == Settings.model_fields["queue_name"].default
    # RQ's own key for that queue, from RQ itself rather than a copy of its naming rule.
    assert trigger["metadata"]["listName"] == Queue.redis_queue_namespace_prefix + queue == "rq:queue:ham"
    assert trigger["metadata"]["activationListLength"] == "0"


def test_keda_targets_the_worker_and_reads_redis_from_the_secret(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    spec = one(docs, "ScaledObject", "ham-worker")["spec"]
    target = one(docs, spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"])
    assert target["kind"] == "Deployment" and "replicas" not in target["spec"], "KEDA must own the replica count"
    assert spec["minReplicaCount"] in (0, 1) and spec["maxReplicaCount"] > spec["minReplicaCount"]
    auth = one(docs, "TriggerAuthentication", spec["triggers"][0]["authenticationRef"]["name"])
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {"address": ("ham-secrets", "REDIS_ADDRESS"), "password": ("ham-secrets", "REDIS_PASSWORD")}
    assert "address" not in spec["triggers"][0]["metadata"], "the Redis address belongs in the Secret"
    if name == "dev":
        secrets = secret_data(docs)
        # KEDA's operator lives in another namespace: host:port with the full service name.
        assert secrets["REDIS_ADDRESS"] == "redis.ham-dev.svc.cluster.local:6379"
        assert f":{secrets['REDIS_PASSWORD']}@" in secrets["HAM_REDIS_URL"]


def test_worker_grace_period_outlasts_the_job_timeout(overlay: tuple[str, list[Doc]]) -> None:
    """SIGTERM on scale-down lets the running job finish: the kubelet must not kill it first."""
    name, docs = overlay
    worker = one(docs, "Deployment", "ham-worker")
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(config_data(docs)["HAM_JOB_TIMEOUT"]), name
    # A job whose end meets an outage waits up to the outage deadline before handing itself back.
    outage = float(config_data(docs).get("HAM_WORKER_OUTAGE_DEADLINE", Settings().worker_outage_deadline))
    assert grace >= int(config_data(docs)["HAM_JOB_TIMEOUT"]) + outage, name


def test_workers_have_a_disruption_budget_that_never_blocks_a_drain(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    pdb = one(docs, "PodDisruptionBudget", "ham-worker")["spec"]
    assert pdb["maxUnavailable"] == 1, name
    pod_labels = one(docs, "Deployment", "ham-worker")["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pdb["selector"]["matchLabels"].items()), name


def test_worker_requests_one_gpu_in_prod_and_none_in_dev() -> None:
    prod = containers(one(render(K8S / "overlays" / "prod"), "Deployment", "ham-worker"))[0]
    assert prod["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert prod["resources"]["requests"]["nvidia.com/gpu"] == 1
    dev_docs = render(K8S / "overlays" / "dev")
    dev = containers(one(dev_docs, "Deployment", "ham-worker"))[0]
    assert "nvidia.com/gpu" not in dev["resources"]["limits"]
    assert "nvidia.com/gpu" not in dev["resources"]["requests"]
    volumes = one(dev_docs, "Deployment", "ham-worker")["spec"]["template"]["spec"]["volumes"]
    assert {v["name"]: sorted(v) for v in volumes}["models"] == ["emptyDir", "name"]


def test_worker_is_ready_only_after_the_model_loads(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    worker = containers(one(docs, "Deployment", "ham-worker"))[0]
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert worker["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert ports["metrics"] == int(config_data(docs)["HAM_WORKER_METRICS_PORT"])
    assert worker["args"] == ["worker"]


def test_pods_run_as_non_root_with_no_privilege_escalation(overlay: tuple[str, list[Doc]]) -> None:
    _, docs = overlay
    for doc in (one(docs, "Deployment", "ham-api"), one(docs, "Deployment", "ham-worker")):
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the uid the Dockerfiles create
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_images_are_pinned_to_a_tag(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    for workload in workloads(docs):
        for container in containers(workload):
            _, tag, digest = split_image(container["image"])
            assert (tag and tag != "latest") or digest, f"{name}: {container['image']} is not pinned"
    prod = {c["name"]: c["image"] for w in workloads(render(K8S / "overlays" / "prod")) for c in containers(w)}
    assert prod == {"api": "registry.example.com/ham/ham-api:0.1.0",
                    "worker": "registry.example.com/ham/ham-worker:0.1.0"}


def test_references_between_objects_resolve(overlay: tuple[str, list[Doc]]) -> None:
    """Services, HPA, PDB and ServiceMonitors point at objects and ports that exist."""
    name, docs = overlay
    pod_labels = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in workloads(docs)}
    port_names = {w["metadata"]["name"]: {p["name"] for c in containers(w) for p in c.get("ports", [])}
                  for w in workloads(docs)}
    for service in (d for d in docs if d["kind"] == "Service"):
        backing = [w for w, labels in pod_labels.items() if selects(service["spec"]["selector"], labels)]
        # The workers' metrics Service covers every worker pool (one per model); others back one workload.
        pools = {w for w in pod_labels if w == "ham-worker" or w.startswith("ham-worker-")}
        if service["metadata"]["name"] == "ham-worker-metrics":
            assert set(backing) == pools, f"{name}: Service ham-worker-metrics selects {backing}, pools {pools}"
        else:
            assert len(backing) == 1, f"{name}: Service {service['metadata']['name']} selects {backing}"
        for port in service["spec"]["ports"]:
            assert all(port["targetPort"] in port_names[workload] for workload in backing)
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        matched = [s for s in docs if s["kind"] == "Service"
                   and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(matched) == 1, f"{name}: ServiceMonitor {monitor['metadata']['name']} matches {len(matched)}"
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in matched[0]["spec"]["ports"]}
    hpa = one(docs, "HorizontalPodAutoscaler", "ham-api")["spec"]
    one(docs, hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"])
    pdb = one(docs, "PodDisruptionBudget", "ham-api")["spec"]
    # A PDB that keeps every replica of the HPA floor available blocks every node drain.
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb["minAvailable"] < hpa["minReplicas"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels["ham-api"])
    for workload in workloads(docs):
        for container in containers(workload):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "ham-secrets" and ref["key"] in SECRET_KEYS, ref
    if name == "dev":
        assert set(secret_data(docs)) == SECRET_KEYS


def test_only_api_workers_and_keda_reach_redis(overlay: tuple[str, list[Doc]]) -> None:
    name, docs = overlay
    policy = one(docs, "NetworkPolicy", "ham-redis")["spec"]
    peers = policy["ingress"][0]["from"]
    allowed = peers[0]["podSelector"]["matchExpressions"][0]
    assert allowed == {"key": "app.kubernetes.io/component", "operator": "In", "values": ["api", "worker"]}
    assert peers[1]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    if name == "dev":
        assert selects(policy["podSelector"]["matchLabels"], one(docs, "StatefulSet", "redis")["spec"]["template"]
                       ["metadata"]["labels"])


def test_dev_redis_keeps_the_queue_safe() -> None:
    redis = containers(one(render(K8S / "overlays" / "dev"), "StatefulSet", "redis"))[0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"


def test_deploy_doc_names_every_secret_key() -> None:
    """prod's Secret is created by hand from docs/deploy.md, so the doc must list every key."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    missing = [key for key in sorted(SECRET_KEYS) if key not in doc]
    assert not missing, f"docs/deploy.md does not mention {missing}"


# --- one pool per model ---------------------------------------------------------------------------


def worker_pools(docs: list[Doc]) -> dict[str, tuple[Doc, Doc]]:
    """Each worker Deployment's model → (the Deployment, the ScaledObject that scales it)."""
    config = config_data(docs)
    pools: dict[str, tuple[Doc, Doc]] = {}
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        target = one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        env = {e["name"]: e.get("value") for e in containers(target)[0].get("env", [])}
        model = env.get("HAM_MODEL") or config["HAM_MODEL"]
        assert model not in pools, f"two pools serve {model}"
        pools[model] = (target, scaled)
    return pools


def test_prod_has_a_worker_pool_per_served_model_each_scaled_on_its_own_queue() -> None:
    docs = render(K8S / "overlays" / "prod")
    config = config_data(docs)
    settings = Settings(models=config["HAM_MODELS"], queue_name=config["HAM_QUEUE_NAME"], model=config["HAM_MODEL"])
    pools = worker_pools(docs)
    # Two pools, exactly the served models; the default model is the base ham-worker on the queue `ham`.
    assert list(settings.served_models) == sorted(pools, key=list(settings.served_models).index)
    assert set(pools) == set(settings.served_models) and len(pools) == 2
    assert pools[settings.default_model][0]["metadata"]["name"] == "ham-worker"
    lists, claims, selectors = set(), set(), []
    for model, (deployment, scaled) in pools.items():
        # The worker of this pool takes queue_name(model); KEDA watches exactly that RQ list.
        worker = Settings(models=config["HAM_MODELS"], queue_name=config["HAM_QUEUE_NAME"], model=model)
        listname = scaled["spec"]["triggers"][0]["metadata"]["listName"]
        assert listname == Queue.redis_queue_namespace_prefix + queue_name(worker, worker.model), (model, listname)
        lists.add(listname)
        volumes = deployment["spec"]["template"]["spec"]["volumes"]
        claims.add(next(v["persistentVolumeClaim"]["claimName"] for v in volumes if v["name"] == "models"))
        selectors.append(deployment["spec"]["selector"]["matchLabels"])
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], template_labels)
        assert containers(deployment)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert lists == {"rq:queue:ham", "rq:queue:ham-stabilityai-stable-diffusion-xl-base-1.0"}
    assert claims == {"ham-models", "ham-models-sdxl"}
    assert selectors[0] != selectors[1]


def test_the_worker_pool_component_is_refused_outside_a_component_list(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("components:\n  - ../notacomponent\n")
    (tmp_path.parent / "notacomponent").mkdir(exist_ok=True)
    (tmp_path.parent / "notacomponent" / "kustomization.yaml").write_text("kind: Kustomization\nresources: []\n")
    with pytest.raises(UnsupportedKustomization, match="kind: Component"):
        render(tmp_path)
