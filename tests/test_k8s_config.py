"""The Kubernetes path (deploy/kubernetes.md) loads and validates, without a cluster:

- ``orchestration.k8s.defs`` (``k8s_job_executor``, partitioned GPU config) loads; each partition's run
  config validates against the job; the release sensor and schedule target that job;
- ``deploy/k8s/dagster-instance.yaml`` validates against Dagster's instance schema, and its run launcher
  (``K8sRunLauncher``), run coordinator, compute-log manager and scheduler are built from it (the
  launcher against a throw-away kubeconfig); the PostgreSQL URL resolves to an installed driver;
- the step pod dagster-k8s would create for an interaction step — built by the same calls its
  ``K8sStepHandler`` makes — requests one GPU sized for the SAE and mounts the hub cache and results
  volumes with the token's Secret; a planted (tiny) SAE's pod requests no GPU;
- ``deploy/k8s/values.yaml`` (Helm): known chart keys, Kubernetes objects that parse strictly, the same
  launcher settings, pools, queue and scheme as the instance file, and a user-code server that loads;
- ``deploy/k8s/storage.yaml`` and ``prefetch-daemonset.yaml`` parse strictly as Kubernetes objects.

Skipped only when the ``k8s`` extra is absent (it is part of the ``test`` extra); installs nothing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

dagster_k8s = pytest.importorskip("dagster_k8s", reason="the k8s extra is not installed (pip install -e '.[k8s]')")

import dagster as dg  # noqa: E402
import kubernetes  # noqa: E402
from dagster._config import process_config  # noqa: E402
from dagster._core.instance.config import dagster_instance_config  # noqa: E402
from dagster._core.storage.dagster_run import DagsterRun  # noqa: E402
from dagster_k8s.container_context import K8sContainerContext  # noqa: E402
from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job, get_user_defined_k8s_config  # noqa: E402
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
KEYS = {
    "small": "gemma-scope-2b-pt-res:layer_12/width_16k/average_l0_82",
    "large": "gemma-scope-9b-pt-res:layer_20/width_1m/average_l0_101",
    "llama": "llama_scope_lxr_8x:l12r_8x",
    "planted": "planted-gemma:layer_0/width_512/average_l0_32",
}
# Top-level keys of the dagster/dagster chart's values schema (helm/dagster/schema: DagsterHelmValues).
CHART_KEYS = {
    "nameOverride",
    "fullnameOverride",
    "dagsterWebserver",
    "dagster-user-deployments",
    "postgresql",
    "generatePostgresqlPasswordSecret",
    "generateCeleryConfigSecret",
    "rabbitmq",
    "redis",
    "flower",
    "ingress",
    "imagePullSecrets",
    "computeLogManager",
    "scheduler",
    "runLauncher",
    "pythonLogs",
    "dagsterDaemon",
    "busybox",
    "migrate",
    "telemetry",
    "serviceAccount",
    "global",
    "retention",
    "concurrency",
    "additionalInstanceConfig",
}
KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:1"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none, namespace: weightlens}}]
current-context: none
"""


def load(name: str):
    return yaml.safe_load((DEPLOY / name).read_text())


def klass(module: str, name: str):
    return getattr(importlib.import_module(module), name)


@pytest.fixture(scope="module")
def k8s_module():
    return importlib.import_module("orchestration.k8s")


@pytest.fixture
def launcher(tmp_path, monkeypatch):
    """The instance file's K8sRunLauncher, built against a throw-away kubeconfig instead of in-cluster."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    section = load("dagster-instance.yaml")["run_launcher"]
    config = {**section["config"], "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
    cls = klass(section["module"], section["class"])
    result = process_config(cls.config_type(), config)
    assert result.success, result.errors
    return cls.from_config_value(None, result.value)


def test_definitions_load_and_every_partition_config_validates(k8s_module):
    defs = k8s_module.defs
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("sae_chain")
    assert job.executor_def.name == "k8s"
    assert defs.resolve_job_def("claims_report_job").executor_def.name == "k8s"
    for key in KEYS.values():
        config = job.partitioned_config.get_run_config_for_partition_key(key)
        dg.validate_run_config(job, config)
        assert set(config["execution"]["config"]["per_step_k8s_config"]) == {"lens_tables", "circuit_tables"}
    # The tracking sensor and schedule launch this job (its per-partition config), not the embedded one.
    assert defs.resolve_sensor_def("sae_release_sensor").job is k8s_module.sae_chain_k8s
    assert defs.resolve_schedule_def("sae_release_schedule").job is k8s_module.sae_chain_k8s
    # The GPU steps are the compute pool's steps.
    compute_ops = {a.op.name for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.op.pool == "compute"}
    assert compute_ops == set(k8s_module.GPU_STEPS)


def test_gpu_requests_follow_the_sae_size(k8s_module):
    gib = {name: k8s_module.weights_gib(key) for name, key in KEYS.items()}
    assert gib["planted"] is None
    assert 4 < gib["small"] < 8 and 30 < gib["large"] < 45 and gib["llama"] < gib["large"]

    def gpu_mib(key):
        terms = k8s_module.step_k8s_config(key)["pod_spec_config"]["affinity"]["node_affinity"][
            "required_during_scheduling_ignored_during_execution"
        ]["node_selector_terms"]
        (expression,) = terms[0]["match_expressions"]
        assert expression["key"] == "nvidia.com/gpu.memory" and expression["operator"] == "Gt"
        return int(expression["values"][0])

    assert gpu_mib(KEYS["small"]) < 16 * 1024 < 40 * 1024 < gpu_mib(KEYS["large"]) < 80 * 1024
    assert "nvidia.com/gpu" not in str(k8s_module.step_k8s_config(KEYS["planted"]))


def test_instance_yaml_validates_and_its_parts_build(tmp_path, monkeypatch, launcher):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "dagster.yaml").write_text((DEPLOY / "dagster-instance.yaml").read_text())
    instance_config = dagster_instance_config(str(tmp_path / "home"))[0]  # schema-validated
    assert instance_config["run_launcher"]["class"] == "K8sRunLauncher"
    assert instance_config["concurrency"]["pools"]["default_limit"] >= 1
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "secret")
    storage = instance_config["storage"]["postgres"]
    from dagster_postgres import DagsterPostgresStorage
    from dagster_postgres.utils import pg_url_from_config

    checked = process_config(DagsterPostgresStorage.config_type(), storage)
    assert checked.success, checked.errors
    import sqlalchemy

    url = pg_url_from_config(checked.value)
    assert url.startswith("postgresql+psycopg2://")
    sqlalchemy.create_engine(url)  # the driver the URL names is installed (no connection is made)
    for section in ("run_coordinator", "scheduler", "compute_logs"):
        part = dict(instance_config[section])
        config = part.get("config", {})
        if section == "compute_logs":
            config = {**config, "base_dir": str(tmp_path / "compute_logs")}  # /data exists only in the pods
        cls = klass(part["module"], part["class"])
        result = (
            process_config(cls.config_type(), config) if hasattr(cls, "config_type") and cls.config_type() else None
        )
        assert result is None or result.success, (section, result.errors)
        cls.from_config_value(None, result.value if result else config)
    assert launcher.job_namespace == "weightlens" and launcher.instance_config_map == "weightlens-dagster-instance"


def step_pod(k8s_module, launcher, key: str, op: str) -> dict:
    """The Job manifest dagster-k8s's K8sStepHandler builds for one step of this partition's run
    (the same merges as ``K8sStepHandler._get_container_context`` and ``launch_step``)."""
    job = k8s_module.defs.resolve_job_def("sae_chain")
    run_config = job.partitioned_config.get_run_config_for_partition_key(key)
    executor = run_config["execution"]["config"]
    run = DagsterRun(job_name="sae_chain", run_id="0" * 32, run_config=run_config, tags={"dagster/partition": key})
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=False)
    op_tags = next(a.op.tags for a in k8s_module.defs.assets if isinstance(a, dg.AssetsDefinition) and a.op.name == op)
    context = context.merge(K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(op_tags)))
    context = context.merge(
        K8sContainerContext(
            run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(executor["per_step_k8s_config"].get(op, {}))
        )
    )
    job_config = context.get_k8s_job_config("registry.example.com/weightlens:0.1.0", launcher)
    manifest = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-x",
        pod_name="dagster-step-x",
        component="step_worker",
        user_defined_k8s_config=context.run_k8s_config,
        labels={"dagster/op": op},
    )
    return kubernetes.client.ApiClient().sanitize_for_serialization(manifest)


def test_interaction_step_pods_get_a_sized_gpu_and_the_shared_volumes(k8s_module, launcher):
    sizes = {}
    for name in ("small", "large"):
        pod = step_pod(k8s_module, launcher, KEYS[name], "circuit_tables")["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
        expression = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][0]["matchExpressions"][0]
        sizes[name] = int(expression["values"][0])
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert {v["name"] for v in pod["volumes"]} >= {"hf-cache", "results"}
        assert (
            pod["volumes"][[v["name"] for v in pod["volumes"]].index("hf-cache")]["hostPath"]["path"]
            == "/var/lib/weightlens/hf-cache"
        )
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["hf-cache"] == "/hf-cache" and mounts["results"] == "/data"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HF_HUB_CACHE"] == "/hf-cache" and env["WEIGHTLENS_DATA_DIR"] == "/data"
        assert "HF_TOKEN" not in env  # from the Secret, never inline
        assert {"secretRef": {"name": "weightlens-hf-token"}} in container["envFrom"]
        assert pod["serviceAccountName"] == "weightlens-dagster"
    assert sizes["small"] < sizes["large"]
    # Weights steps: CPU pods with the same volumes; planted interaction steps: no GPU.
    for key, op in ((KEYS["large"], "model_weights"), (KEYS["planted"], "circuit_tables")):
        pod = step_pod(k8s_module, launcher, key, op)["spec"]["template"]["spec"]
        assert "nvidia.com/gpu" not in str(pod["containers"][0].get("resources")) and "affinity" not in pod
        assert {v["name"] for v in pod["volumes"]} >= {"hf-cache", "results"}


def camel_to_snake_keys(values_launcher: dict) -> dict:
    return {
        "job_namespace": values_launcher["jobNamespace"],
        "load_incluster_config": values_launcher["loadInclusterConfig"],
        "image_pull_policy": values_launcher["imagePullPolicy"],
        "env_secrets": [s["name"] for s in values_launcher["envSecrets"]],
        "env_vars": values_launcher["envVars"],
        "volume_mounts": [
            k8s_snake_case_dict(kubernetes.client.V1VolumeMount, m) for m in values_launcher["volumeMounts"]
        ],
        "volumes": [k8s_snake_case_dict(kubernetes.client.V1Volume, v) for v in values_launcher["volumes"]],
        "run_k8s_config": {
            "container_config": k8s_snake_case_dict(
                kubernetes.client.V1Container, values_launcher["runK8sConfig"]["containerConfig"]
            )
        },
    }


def test_helm_values_match_the_instance_and_load_the_code_location():
    values, instance = load("values.yaml"), load("dagster-instance.yaml")
    assert set(values) <= CHART_KEYS, set(values) - CHART_KEYS
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = instance["run_launcher"]["config"]
    for name, value in camel_to_snake_keys(values["runLauncher"]["config"]["k8sRunLauncher"]).items():
        got = launcher[name]
        if name == "run_k8s_config":
            got = {"container_config": k8s_snake_case_dict(kubernetes.client.V1Container, got["container_config"])}
        assert value == got, name
    # What the chart names and renders = what the instance file says.
    assert f"{values['fullnameOverride']}-instance" == launcher["instance_config_map"]
    assert values["global"]["postgresqlSecretName"] == launcher["postgres_password_secret"]
    assert values["global"]["serviceAccountName"] == launcher["service_account_name"]
    assert values["global"]["dagsterHome"] == launcher["dagster_home"]
    pg = instance["storage"]["postgres"]["postgres_db"]
    assert (
        values["postgresql"]["postgresqlHost"],
        values["postgresql"]["postgresqlUsername"],
        values["postgresql"]["postgresqlDatabase"],
        values["postgresql"]["postgresqlScheme"],
        values["postgresql"]["service"]["port"],
    ) == (pg["hostname"], pg["username"], pg["db_name"], pg["scheme"], pg["port"])
    assert (
        values["concurrency"]["enabled"]
        and values["concurrency"]["pools"]["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    )
    daemon = values["dagsterDaemon"]
    assert daemon["runCoordinator"]["type"] == instance["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == instance["concurrency"]["runs"]["max_concurrent_runs"]
    monitoring = instance["run_monitoring"]
    assert (
        daemon["runMonitoring"]["startTimeoutSeconds"],
        daemon["runMonitoring"]["pollIntervalSeconds"],
        daemon["runMonitoring"]["freeSlotsAfterRunEndSeconds"],
    ) == (
        monitoring["start_timeout_seconds"],
        monitoring["poll_interval_seconds"],
        monitoring["free_slots_after_run_end_seconds"],
    )
    custom = values["computeLogManager"]["config"]["customComputeLogManager"]
    assert {k: custom[k] for k in ("module", "class", "config")} == instance["compute_logs"]
    # Webserver volumes and the user-code server's resources parse as Kubernetes objects.
    web = values["dagsterWebserver"]
    [k8s_snake_case_dict(kubernetes.client.V1Volume, v) for v in web["volumes"]]
    [k8s_snake_case_dict(kubernetes.client.V1VolumeMount, m) for m in web["volumeMounts"]]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    k8s_snake_case_dict(kubernetes.client.V1ResourceRequirements, deployment["resources"])
    # The user-code server (`dagster api grpc -m orchestration.k8s -a defs`) loads the Definitions.
    args = deployment["dagsterApiGrpcArgs"]
    module, attribute = args[args.index("-m") + 1], args[args.index("-a") + 1]
    assert isinstance(getattr(importlib.import_module(module), attribute), dg.Definitions)


def test_cluster_objects_parse_strictly():
    models = {"PersistentVolumeClaim": "V1PersistentVolumeClaim", "Secret": "V1Secret", "DaemonSet": "V1DaemonSet"}
    seen = []
    for name in ("storage.yaml", "prefetch-daemonset.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            model = getattr(kubernetes.client, models[doc["kind"]])
            k8s_model_from_dict(model, k8s_snake_case_dict(model, doc))  # unknown fields raise
            seen.append(doc["kind"])
    assert sorted(seen) == ["DaemonSet", "PersistentVolumeClaim", "Secret", "Secret"]
    daemonset = load("prefetch-daemonset.yaml")
    command = daemonset["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[:4] == ["python", "-m", "orchestration.k8s", "prefetch"]
    from core.registry import get_release

    assert all(get_release(r) for r in command[4:])
    volume = daemonset["spec"]["template"]["spec"]["volumes"][0]
    assert volume["hostPath"]["path"] == "/var/lib/weightlens/hf-cache"  # the same node cache as the pods
