"""deploy/ checked without a cluster: the Kustomize overlays build, every manifest validates
against the Kubernetes schemas, yamllint passes, and policies hold (pinned images, resources
and probes on every container, nothing privileged, secrets never inline); the Prometheus rules
pass promtool's unit tests; the Dagster Helm values, the dashboard and the images are checked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from refinery.core.settings import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
KUBE_VERSIONS = ("1.30.0", "1.33.0")
# Names of variables that hold secrets (API keys, passwords, URLs with credentials).
SECRETISH = re.compile(
    r"(^|_)(KEYS?|SECRET|PASSWORD|TOKEN|SALT)(_|$)|DATABASE_URL|REDIS_URL|BACKEND_STORE_URI"
)


def kubectl() -> str:
    exe = shutil.which("kubectl")
    assert exe, "kubectl renders deploy/k8s: install it (the project's machines carry v1.32)"
    return exe


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every manifest set deploy/ holds, as kubectl builds it."""
    from serving.deploy import render

    return {
        **{name: kustomize(K8S / "overlays" / name) for name in OVERLAYS},
        "mlflow": kustomize(DEPLOY / "mlflow"),
        # with the image model service (a Bento that serves an image champion)
        **{
            f"{name}+images": [
                d for d in yaml.safe_load_all(render(name, "refinery:1.0", images=True)) if d
            ]
            for name in OVERLAYS
        },
    }


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] == "Deployment"
    ]


def containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{name}/{c['name']}", c)
        for name, spec in pod_specs(docs)
        for c in spec.get("initContainers", []) + spec["containers"]
    ]


def config_map(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The generated `refinery-config-<hash>` ConfigMap of one render."""
    (cm,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("refinery-config-")
    ]
    return cm


# --- building and validating ------------------------------------------------------------------
SERVICES = {"refinery", "refinery-chat"}  # the entry and the chat model (serving/service.py)


def test_overlays_build_the_two_services_and_their_autoscaling(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        deployments = by_kind(docs, "Deployment")
        assert set(deployments) == SERVICES
        assert set(by_kind(docs, "Service")) == set(deployments)
        assert set(by_kind(docs, "HorizontalPodAutoscaler")) == set(deployments)
        assert set(by_kind(docs, "PodDisruptionBudget")) == set(deployments)
        assert set(by_kind(docs, "NetworkPolicy")) == {"refinery-chat"}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(rendered, version):
    import kubernetes_validate

    for name, docs in rendered.items():
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {err.message}")


def test_the_validator_rejects_a_misspelt_field(rendered):
    """The schema check has teeth: strict mode refuses a field Kubernetes does not know."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(by_kind(rendered["cpu"], "Deployment")["refinery"]))
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_yamllint_passes_on_deploy():
    files = [str(p) for p in sorted(DEPLOY.rglob("*.y*ml")) if p.suffix in (".yaml", ".yml")]
    assert len(files) > 10
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "yamllint",
            "--strict",
            "-c",
            str(DEPLOY / ".yamllint.yaml"),
            *files,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- policies ------------------------------------------------------------------------------------
def test_images_are_pinned_never_latest(rendered):
    for name, docs in rendered.items():
        for where, c in containers(docs):
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{name} {where}: image {image!r} is not pinned"
    for dockerfile in DEPLOY.glob("images/*/Dockerfile"):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("FROM "):
                image = line.split()[1]
                assert re.search(r":\d+\.\d+\.\d+", image), f"{dockerfile}: {image} (exact version)"
                assert "latest" not in image


def test_every_container_has_resources_and_probes(rendered):
    for name, docs in rendered.items():
        for where, c in containers(docs):
            for kind in ("requests", "limits"):
                got = c.get("resources", {}).get(kind, {})
                assert {"cpu", "memory"} <= set(got), f"{name} {where}: {kind} {got}"
            for probe in ("livenessProbe", "readinessProbe"):
                assert c.get(probe), f"{name} {where}: no {probe}"


def test_probes_use_the_services_health_endpoints(rendered):
    for overlay in OVERLAYS:
        for where, c in containers(rendered[overlay]):
            assert c["livenessProbe"]["httpGet"]["path"] == "/livez", where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert c["startupProbe"]["httpGet"]["path"] == "/readyz", where


def test_nothing_runs_privileged(rendered):
    for name, docs in rendered.items():
        for pod, spec in pod_specs(docs):
            for flag in ("hostNetwork", "hostPID", "hostIPC"):
                assert not spec.get(flag), f"{name} {pod}: {flag}"
            assert spec["securityContext"]["runAsNonRoot"] is True, pod
            assert spec.get("automountServiceAccountToken") is False, pod
            assert not any("hostPath" in v for v in spec.get("volumes", [])), pod
        for where, c in containers(docs):
            ctx = c.get("securityContext", {})
            assert ctx.get("privileged") is not True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where


def test_secrets_are_never_inline(rendered):
    for name, docs in rendered.items():
        assert not by_kind(docs, "Secret"), f"{name}: a Secret belongs outside the repository"
        for cm in by_kind(docs, "ConfigMap").values():
            for key in cm.get("data", {}):
                assert not SECRETISH.search(key), f"{name}: {cm['metadata']['name']} holds {key}"
        for where, c in containers(docs):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env, f"{name} {where}: {env['name']} inline"
                    assert "secretKeyRef" in env["valueFrom"], f"{name} {where}: {env['name']}"
    # The entry service's keys and database URL come from the Secret.
    entry = dict(containers(rendered["cpu"]))["refinery/entry"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in entry["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs["REFINERY_API_KEYS"] == refs["REFINERY_DATABASE_URL"] == "refinery-secrets"


def test_policy_checks_catch_violations():
    """The policy helpers fail on what they must refuse (a latest tag, a missing probe)."""
    bad = {
        "kind": "Deployment",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x:latest"}]}}},
    }
    with pytest.raises(AssertionError):
        test_images_are_pinned_never_latest({"bad": [bad]})
    with pytest.raises(AssertionError):
        test_every_container_has_resources_and_probes({"bad": [bad]})


# --- the services' layout ----------------------------------------------------------------------
def service_names() -> set[str]:
    """The BentoML service names in serving/service.py."""
    text = (REPO_ROOT / "serving" / "service.py").read_text()
    return set(re.findall(r'@bentoml\.service\(\s*name="([^"]+)"', text))


def test_each_deployment_runs_one_bento_service_and_the_entry_depends_on_the_others(rendered):
    names = service_names()
    assert names == SERVICES
    docs = rendered["cpu"]
    services = by_kind(docs, "Service")
    for name, spec in pod_specs(docs):
        args = spec["containers"][0]["args"]
        assert args[0] == "start-http-server"
        served = [a.split("=", 1)[1] for a in args if a.startswith("--service-name=")]
        if name == "refinery":
            assert not served  # the entry service: its dependencies are remote
            depends = dict(
                a.split("=", 1)[1].split("=", 1) for a in args if a.startswith("--depends=")
            )
            assert set(depends) == names - {"refinery"}
            for dep, url in depends.items():
                host, port = re.match(r"http://([^:/]+):(\d+)$", url).groups()
                assert (
                    host in services and int(port) == services[host]["spec"]["ports"][0]["port"]
                ), dep
        else:
            assert served == [name]


def test_selectors_match_the_pods(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        labels = {
            n: s["template"]["metadata"]["labels"]
            for n, s in (
                (d["metadata"]["name"], d["spec"]) for d in docs if d["kind"] == "Deployment"
            )
        }
        for kind in ("Service", "PodDisruptionBudget"):
            for name, doc in by_kind(docs, kind).items():
                selector = doc["spec"]["selector"]
                selector = selector.get("matchLabels", selector)
                assert selector.items() <= labels[name].items(), f"{kind} {name}"
        for name, hpa in by_kind(docs, "HorizontalPodAutoscaler").items():
            assert hpa["spec"]["scaleTargetRef"]["name"] in labels
            pods = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
            assert pods[0]["pods"]["metric"]["name"] == "refinery_requests_in_flight", name
            assert hpa["spec"]["minReplicas"] >= 2  # the PDB keeps one while another drains
        # The NetworkPolicy guards the chat pods and lets the entry pods in.
        policy = by_kind(docs, "NetworkPolicy")["refinery-chat"]["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels["refinery-chat"].items()
        allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
        assert allowed.items() <= labels["refinery"].items()


def test_autoscaling_metrics_per_service(rendered):
    """The entry scales on CPU (it runs the embedding model and the guard) and on requests in
    flight; the chat service on requests in flight only (its engine's threads are busy
    whenever one request runs, so its CPU is no measure of its load)."""
    for overlay in OVERLAYS:
        hpas = by_kind(rendered[overlay], "HorizontalPodAutoscaler")
        kinds = {name: [m["type"] for m in h["spec"]["metrics"]] for name, h in hpas.items()}
        assert kinds == {"refinery": ["Resource", "Pods"], "refinery-chat": ["Pods"]}, overlay
        assert hpas["refinery"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_threads_follow_the_containers_cpu_limit(rendered):
    """torch (entry) and the engine (chat) would size their thread pools by the node's cores."""
    for overlay in OVERLAYS:
        found = dict(containers(rendered[overlay]))
        for where, var in (("refinery/entry", "OMP_NUM_THREADS"),
                           ("refinery-chat/chat", "REFINERY_TORCH_THREADS")):  # fmt: skip
            (env,) = [e for e in found[where]["env"] if e["name"] == var]
            ref = env["valueFrom"]["resourceFieldRef"]
            assert ref == {"containerName": where.split("/")[1], "resource": "limits.cpu"}, where


def test_the_gpu_overlay_puts_the_chat_model_on_cuda(rendered):
    for overlay in OVERLAYS:
        found = dict(containers(rendered[overlay]))
        chat = found["refinery-chat/chat"]
        env = {e["name"]: e.get("value") for e in chat["env"]}
        gpus = chat["resources"]["limits"].get("nvidia.com/gpu")
        if overlay == "gpu":
            assert env["REFINERY_DEVICE"] == "cuda" and gpus == "1"
            spec = dict(pod_specs(rendered[overlay]))["refinery-chat"]
            assert spec["tolerations"] and spec["nodeSelector"]
        else:
            assert env["REFINERY_DEVICE"] == "cpu" and gpus is None
        for name, c in found.items():
            if name != "refinery-chat/chat":
                assert "nvidia.com/gpu" not in c["resources"]["limits"], name


def test_the_image_component_adds_its_service_and_the_entrys_dependency(rendered):
    for overlay in OVERLAYS:
        plain, full = rendered[overlay], rendered[f"{overlay}+images"]
        assert "refinery-image" not in by_kind(plain, "Deployment")
        for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "NetworkPolicy"):  # fmt: skip
            assert "refinery-image" in by_kind(full, kind), kind
        args = by_kind(full, "Deployment")["refinery"]["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
        assert "--depends=refinery-image=http://refinery-image:3000" in args
        assert "--depends=refinery-chat=http://refinery-chat:3000" in args
        image_args = by_kind(full, "Deployment")["refinery-image"]["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
        assert "--service-name=refinery-image" in image_args


# --- rendering with the champion's image --------------------------------------------------------
def test_render_points_every_service_at_the_champions_image():
    from serving.deploy import image_tag, render

    image = image_tag("refinery:abc123def", "registry.example/ml/refinery")
    assert image == "registry.example/ml/refinery:abc123def"
    for overlay in OVERLAYS:
        docs = [d for d in yaml.safe_load_all(render(overlay, image)) if d]
        images = {c["image"] for _, c in containers(docs)}
        assert images == {image}
        assert "unrendered" not in yaml.safe_dump_all(docs)


@pytest.mark.parametrize(
    ("overlay", "image"),
    [("tpu", "refinery:1"), ("cpu", "refinery:latest"), ("cpu", "refinery"), ("cpu", "a:b/c")],
)
def test_render_refuses_bad_input(overlay, image):
    from serving.deploy import DeployError, render

    with pytest.raises(DeployError):
        render(overlay, image)


def test_image_tag_refuses_an_unpinned_bento():
    from serving.deploy import DeployError, image_tag

    for tag in ("refinery", "refinery:", "refinery:latest"):
        with pytest.raises(DeployError):
            image_tag(tag)
    assert image_tag("refinery:v1") == "refinery:v1"


# --- Prometheus, adapter, dashboard --------------------------------------------------------------
def test_promtool_checks_the_rules_and_passes_their_unit_tests():
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus (scripts/system-deps.sh)"
    rules = DEPLOY / "prometheus" / "rules" / "refinery.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = DEPLOY / "prometheus" / "tests" / "refinery_test.yml"
    run = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True, text=True)
    assert run.returncode == 0 and "SUCCESS" in run.stdout, run.stdout + run.stderr


def test_every_alert_the_issue_names_exists_with_a_unit_test():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "refinery.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "RefineryP99LatencyHigh",
        "RefineryHigh5xxRate",
        "RefineryCostPerRequestHigh",
        "RefineryGuardBlockSpike",
        "RefineryTrafficLogDropping",
        "RefineryDriftCheckFailed",
        "RefineryEngineQueueBacklog",
    }
    tested = (DEPLOY / "prometheus" / "tests" / "refinery_test.yml").read_text()
    assert all(f"alertname: {a}" in tested for a in alerts)


def test_prometheus_config_loads_the_rules(tmp_path):
    """promtool checks the scrape config and loads its rule files. Debian's Prometheus is built
    without Kubernetes discovery, so its pod discovery is checked here and swapped for a static
    target before promtool reads the rest (relabelling, rule files)."""
    promtool = shutil.which("promtool")
    assert promtool
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "refinery"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:3000"]}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "component"} <= targets  # what the adapter and dashboard group by
    config["rule_files"] = [str(DEPLOY / "prometheus" / f) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 15 rules found" in proc.stdout


def test_the_dashboard_covers_what_the_issue_lists():
    dash = json.loads((DEPLOY / "grafana" / "refinery-dashboard.json").read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in panels)
    text = " ".join(t["expr"] for p in panels for t in p["targets"])
    for metric in (
        "bentoml_service_request_total",  # requests
        "api_latency_seconds:p50",
        "api_latency_seconds:p99",
        "refinery_tokens_total",
        "refinery_engine_generated_tokens_total",  # tokens/s of the engine
        "refinery_engine_running_requests",  # batch size
        "refinery_engine_waiting_requests",  # queue depth
        "engine_queued_requests",
        "bentoml_service_request_in_progress",  # the HPAs' metric
        "refinery_speculative_tokens_total",
        "refinery_shared_generations_total",
        "refinery_cache_requests_total",
        "cost_per_request_usd",
        "refinery_guard_blocks_total",
        "refinery_model_info",
    ):
        assert metric in text, metric
    # Panels never overlap on the grid.
    cells = [
        (x, y)
        for p in panels
        for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
        for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])
    ]
    assert len(cells) == len(set(cells)) and all(0 <= x < 24 for x, _ in cells)


def refinery_metrics_used() -> set[str]:
    """The refinery_* metric names that deploy/ queries (histogram suffixes removed)."""
    rules = (DEPLOY / "prometheus" / "rules" / "refinery.yml").read_text()
    dash = json.loads((DEPLOY / "grafana" / "refinery-dashboard.json").read_text())
    text = rules + " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    names = set(re.findall(r"(?<![:\w])(refinery_[a-z_]+)", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_deploy_queries_only_metrics_the_code_exports():
    """A renamed or removed metric fails here, not on a dashboard in production."""
    from refinery.core.pushgateway import drift_gauges
    from serving import metrics

    # (the names as declared: counters with their _total, as Prometheus shows them)
    exported = {m._original_name for m in vars(metrics).values() if hasattr(m, "_original_name")}
    exported |= set(drift_gauges(passed=True))
    assert "refinery_engine_waiting_requests" in exported  # the names were read
    assert refinery_metrics_used() - exported == set()


def test_adapter_serves_the_metric_the_hpas_use():
    values = yaml.safe_load((DEPLOY / "prometheus" / "adapter-rules.yaml").read_text())
    names = {r["name"]["as"] for r in values["rules"]["custom"]}
    assert names == {"refinery_requests_in_flight"}


# --- Dagster on the cluster -----------------------------------------------------------------------
def test_model_jobs_get_run_pods_the_k8s_launcher_accepts():
    from dagster_k8s.job import UserDefinedDagsterK8sConfig

    from orchestration.cluster import K8S_CONFIG_TAG, model_job_tags
    from refinery.core.settings import RunSettings

    cpu = json.loads(model_job_tags(RunSettings())[K8S_CONFIG_TAG])
    gpu = json.loads(model_job_tags(RunSettings(run_accelerator="gpu"))[K8S_CONFIG_TAG])
    for config in (cpu, gpu):
        parsed = UserDefinedDagsterK8sConfig.from_dict(config)
        assert parsed.container_config["resources"]["limits"]["memory"]
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert gpu["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    four = model_job_tags(RunSettings(run_accelerator="gpu", run_gpus=4))
    assert (
        json.loads(four[K8S_CONFIG_TAG])["container_config"]["resources"]["requests"][
            "nvidia.com/gpu"
        ]
        == "4"
    )
    with pytest.raises(ValueError, match="REFINERY_RUN_ACCELERATOR"):
        RunSettings.from_env({"REFINERY_RUN_ACCELERATOR": "tpu"})
    with pytest.raises(ValueError, match="REFINERY_RUN_GPUS"):
        RunSettings.from_env({"REFINERY_RUN_ACCELERATOR": "gpu", "REFINERY_RUN_GPUS": "two"})


def test_the_model_jobs_carry_the_run_pod_tag():
    from orchestration.cluster import K8S_CONFIG_TAG
    from orchestration.definitions import defs

    for name in ("train", "evaluate", "retrain"):
        tags = defs.resolve_job_def(name).tags
        assert K8S_CONFIG_TAG in tags and tags["refinery/pool"] == "models", name
    assert K8S_CONFIG_TAG not in defs.resolve_job_def("ingest").tags


def test_dagster_values_use_the_k8s_launcher_external_postgres_and_our_image():
    values = yaml.safe_load((DEPLOY / "dagster" / "values.yaml").read_text())
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    # The driver dagster-postgres works with under SQLAlchemy 2.1, as Refinery's own dagster.yaml.
    assert values["postgresql"]["postgresqlScheme"] == "postgresql+psycopg2"
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "orchestration.definitions"]
    assert deployment["image"]["tag"] != "latest"
    limits = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    assert {"key": "refinery/pool", "value": "models", "limit": 1} in limits["tagConcurrencyLimits"]
    gpu = yaml.safe_load((DEPLOY / "dagster" / "values-gpu.yaml").read_text())
    env = {e["name"]: e["value"] for e in gpu["dagster-user-deployments"]["deployments"][0]["env"]}
    assert env["REFINERY_RUN_ACCELERATOR"] == "gpu"


def test_the_dagster_image_serves_the_code_location():
    text = (DEPLOY / "images" / "dagster" / "Dockerfile").read_text()
    assert '"dagster", "api", "grpc"' in text and "orchestration.definitions" in text
    assert '-e ".[cluster]"' in text and "-c constraints.txt" in text


def test_bentofile_pins_the_base_image():
    bentofile = yaml.safe_load((DEPLOY / "bentofile.yaml").read_text())
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", bentofile["docker"]["base_image"])


# --- the Dagster Helm values against the chart's values schema ----------------------------------
CHART_SCHEMA = DEPLOY / "dagster" / "chart-schema" / "values.schema.json"
K8S_SCHEMA_URL = "https://kubernetesjsonschema.dev/"


def without_required(node: Any) -> Any:
    """Helm validates the chart's defaults merged with ours; without the defaults here, every
    key and type we set is checked but nothing is required."""
    if isinstance(node, dict):
        return {k: without_required(v) for k, v in node.items() if k != "required"}
    if isinstance(node, list):
        return [without_required(v) for v in node]
    return node


def chart_validator() -> Any:
    """The chart's schema, its references to kubernetesjsonschema.dev answered offline by the
    Kubernetes schemas kubernetes-validate ships (strict: unknown fields refused)."""
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT7

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    k8s = json.loads(
        (schemas / f"v{KUBE_VERSIONS[0]}-local-strict" / "_definitions.json").read_text()
    )
    # The chart points at `#/definitions/<type>`; these schemas keep the types under `$defs`
    # and refer to each other there. Both names, and no `$id`: the chart's URL stays the base.
    k8s = {"definitions": k8s["$defs"], "$defs": k8s["$defs"], "$schema": k8s["$schema"]}

    def retrieve(uri: str) -> Resource:
        assert uri.startswith(K8S_SCHEMA_URL) and uri.endswith("/_definitions.json"), uri
        return Resource.from_contents(k8s, default_specification=DRAFT7)

    schema = without_required(json.loads(CHART_SCHEMA.read_text()))
    return jsonschema.Draft7Validator(schema, registry=Registry(retrieve=retrieve))


def helm_merge(base: Any, extra: Any) -> Any:
    """Helm's merge of values files: maps deep, everything else (lists too) replaced."""
    if isinstance(base, dict) and isinstance(extra, dict):
        return {k: helm_merge(base[k], v) if k in base else v for k, v in {**base, **extra}.items()}
    return extra


def test_dagster_values_match_the_charts_values_schema():
    validator = chart_validator()
    values = yaml.safe_load((DEPLOY / "dagster" / "values.yaml").read_text())
    gpu = helm_merge(values, yaml.safe_load((DEPLOY / "dagster" / "values-gpu.yaml").read_text()))
    for name, doc in (("values.yaml", values), ("values.yaml + values-gpu.yaml", gpu)):
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        assert not errors, f"{name}: {errors}"


@pytest.mark.parametrize(
    "mistake",
    [
        {"runLauncher": {"type": "K8sRunLaunch", "config": {}}},  # not an allowed launcher
        {
            "runLauncher": {
                "type": "K8sRunLauncher",
                "config": {"k8sRunLauncher": {"runK8sConfg": {}}},
            }
        },
        {"postgresql": {"enabled": "no"}},  # a string for a boolean
        {"dagster-user-deployments": {"deployments": [{"name": "x", "port": "3030"}]}},
        # Kubernetes' own schema, reached through the chart's reference: resources has no `limit`.
        {"dagsterWebserver": {"resources": {"limit": {"cpu": "1"}}}},
    ],
)
def test_the_chart_schema_check_refuses_mistakes(mistake):
    values = helm_merge(yaml.safe_load((DEPLOY / "dagster" / "values.yaml").read_text()), mistake)
    assert list(chart_validator().iter_errors(values))


# --- the capacity plan --------------------------------------------------------------------------
def test_the_capacity_plan_in_the_docs_is_computed_from_its_inputs():
    from serving.capacity import BEGIN, DOC, END, load_inputs, render

    doc = DOC.read_text()
    section = doc[doc.index(BEGIN) : doc.index(END) + len(END)]
    assert section == render(load_inputs()), "run: python -m serving.capacity --write"


def test_the_capacity_plan_sizes_replicas_from_measured_throughput():
    from serving.capacity import load_inputs, plan

    inputs = load_inputs()
    p = plan(inputs)
    entry, chat = p["cpu"]["rows"]
    measured = inputs["replica"]["chat_cpu"]
    # Chat replicas at their HPA target answer what one answered in the benchmark.
    assert (chat.replicas - 1) * measured["rps"] < chat.load_rps <= chat.replicas * measured["rps"]
    # The entry: enough for its CPU work and for the chat requests it holds.
    assert entry.replicas * inputs["entry_inflight_target"] >= p["inflight"]
    assert p["cpu"]["usd_per_request"] > 0 and p["gpu"]["usd_per_request"] > 0
    assert p["cpu"]["cores"] == sum(r.cores for r in p["cpu"]["rows"])
    doubled = {
        **inputs,
        "replica": {**inputs["replica"], "chat_cpu": {**measured, "rps": 2 * measured["rps"]}},
    }
    assert plan(doubled)["cpu"]["rows"][1].replicas == math.ceil(
        chat.load_rps / (2 * measured["rps"])
    )
    # Twice the cache hits one entry replica answers: fewer entry cores for the same mix.
    faster = {
        **inputs,
        "replica": {
            **inputs["replica"],
            "entry": {**inputs["replica"]["entry"], "cache_hit_rps": 1e9, "embeddings_rps": 1e9},
        },
    }
    assert plan(faster)["gpu"]["rows"][0].replicas == 1


def test_the_capacity_inputs_must_match_the_chat_hpa_target(tmp_path):
    import yaml

    from serving.capacity import INPUTS, load_inputs

    inputs = yaml.safe_load(INPUTS.read_text())
    inputs["replica"]["chat_cpu"]["clients"] = 8
    (tmp_path / "capacity.yaml").write_text(yaml.safe_dump(inputs))
    with pytest.raises(ValueError, match="HPA"):
        load_inputs(tmp_path / "capacity.yaml")


def test_the_hpa_targets_follow_the_plan(rendered):
    """One figure per service, everywhere: the entry's in-flight target is half its
    REFINERY_MAX_INFLIGHT; the chat's is its batch (REFINERY_CHAT_MAX_BATCH), the load the
    benchmark measured it under, and the batch the engine-queue rule counts beyond."""
    from serving.capacity import load_inputs

    inputs = load_inputs()
    config = config_map(rendered["cpu"])["data"]
    for overlay in OVERLAYS:
        hpas = by_kind(rendered[overlay], "HorizontalPodAutoscaler")
        targets = {
            name: int(m["pods"]["target"]["averageValue"])
            for name, h in hpas.items()
            for m in h["spec"]["metrics"]
            if m["type"] == "Pods"
        }
        assert targets["refinery"] == inputs["entry_inflight_target"]
        assert targets["refinery-chat"] == inputs["chat_inflight_target"]
    assert int(config["REFINERY_MAX_INFLIGHT"]) == 2 * inputs["entry_inflight_target"]
    batch = int(config["REFINERY_CHAT_MAX_BATCH"])
    assert batch == inputs["chat_inflight_target"] == inputs["replica"]["chat_cpu"]["clients"]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "refinery.yml").read_text())
    (queued,) = [
        r["expr"] for g in rules["groups"] for r in g["rules"]
        if r.get("record") == "refinery:engine_queued_requests:avg"
    ]  # fmt: skip
    assert re.search(rf"refinery_engine_running_requests(\{{[^}}]*\}})? - {batch}\b", queued), (
        queued
    )


# --- small pieces the manifests rely on ----------------------------------------------------------
def test_the_device_switch_refuses_cuda_without_a_gpu():
    from refinery.generation.generator import select_device

    assert select_device("auto", cuda_available=False) == "cpu"
    assert select_device("auto", cuda_available=True) == "cuda"
    assert select_device("cpu", cuda_available=True) == "cpu"
    assert select_device("cuda", cuda_available=True) == "cuda"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda", cuda_available=False)
    with pytest.raises(ValueError, match="device must be one of"):
        select_device("tpu", cuda_available=True)


def test_pushgateway_body_is_prometheus_text():
    from refinery.core.pushgateway import drift_gauges, exposition

    text = exposition(drift_gauges(passed=False, at=1700000000.0))
    assert "# TYPE refinery_drift_check_passed gauge\nrefinery_drift_check_passed 0.0\n" in text
    assert "refinery_drift_check_timestamp_seconds 1700000000.0" in text
    with pytest.raises(ValueError):
        exposition({"bad name": (1.0, "x")})
    with pytest.raises(ValueError):
        exposition({"nan_gauge": (float("nan"), "x")})


def test_the_drift_result_is_pushed_only_where_a_pushgateway_is_named():
    from refinery.core.pushgateway import push_drift

    assert push_drift(False, None) is None  # nothing configured: nothing sent
    with pytest.raises(OSError):  # configured but unreachable: the caller warns
        push_drift(False, "http://127.0.0.1:9")


# --- deploying as they read ---------------------------------------------------------------------
def test_deployments_an_hpa_scales_leave_the_replica_count_to_it(rendered):
    for name, docs in rendered.items():
        deployments = by_kind(docs, "Deployment")
        for hpa in by_kind(docs, "HorizontalPodAutoscaler").values():
            target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
            assert "replicas" not in target["spec"], f"{name}: {target['metadata']['name']}"


def test_config_is_generated_so_a_change_rolls_the_pods(rendered, tmp_path):
    for overlay in ("cpu", "gpu", "cpu+images"):
        docs = rendered[overlay]
        name = config_map(docs)["metadata"]["name"]
        refs = {
            f["configMapRef"]["name"]
            for _, c in containers(docs)
            for f in c.get("envFrom", [])
            if "configMapRef" in f
        }
        assert refs == {name}, overlay  # every reader points at this content's name
    assert config_map(rendered["gpu"])["data"]["REFINERY_PRICE_PER_HOUR"] == "0.80"
    assert config_map(rendered["cpu"])["data"]["REFINERY_PRICE_PER_HOUR"] == "0.10"
    # One setting changed: a new name, so every Deployment's pod template changes and rolls.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    env = copy / "base" / "config.env"
    env.write_text(env.read_text().replace("REFINERY_GUARD=block", "REFINERY_GUARD=flag"))
    changed = config_map(kustomize(copy / "overlays" / "cpu"))["metadata"]["name"]
    assert changed != config_map(rendered["cpu"])["metadata"]["name"]


def test_replicas_spread_over_nodes_and_zones(rendered):
    for name, docs in rendered.items():
        scaled = {
            h["spec"]["scaleTargetRef"]["name"]
            for h in by_kind(docs, "HorizontalPodAutoscaler").values()
        }
        for deployment in (d for n, d in by_kind(docs, "Deployment").items() if n in scaled):
            where = f"{name}: {deployment['metadata']['name']}"
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            spread = {
                c["topologyKey"]: c
                for c in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
            }
            node = spread["kubernetes.io/hostname"]
            assert node["whenUnsatisfiable"] == "DoNotSchedule" and node["maxSkew"] == 1, where
            assert spread["topology.kubernetes.io/zone"]["whenUnsatisfiable"] == "ScheduleAnyway"
            for c in spread.values():
                selector = c["labelSelector"]["matchLabels"]
                assert selector.items() <= labels.items(), where  # counts this Deployment's pods
