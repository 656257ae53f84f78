"""The code location for Kubernetes (optional extra ``k8s``; deploy/kubernetes.md): each run is a pod
(``K8sRunLauncher``, set in the instance, deploy/k8s/) and each step its own pod (``k8s_job_executor``).

The interaction steps (``lens_tables``, ``circuit_tables``: the ``compute`` pool) get a GPU, sized per
partition: a step pod's Kubernetes config comes from the run config (``per_step_k8s_config``), and the
``sae_chain`` job's config is partitioned (``PartitionedConfig``), so a Gemma-2-2B 16k SAE asks for any
GPU while a Gemma-2-9B 1m SAE asks for one with the memory its weights need. Steps outside the pool run on
CPU pods. Op tags (``dagster-k8s/config``) would do the same per op but are fixed per op, not per SAE.

Nothing here is imported by the embedded default (``orchestration.definitions``).
"""

from __future__ import annotations

import math
import re

import dagster as dg
from dagster_k8s import k8s_job_executor

from core.registry import get_release, parse_key
from orchestration.definitions import resources
from orchestration.jobs import ALL_ASSETS, SAE_ASSETS, report_job, sae_chain_job
from orchestration.partitions import sae_partitions
from orchestration.sensors import sae_release_schedule, sae_release_sensor

GPU_STEPS = ("lens_tables", "circuit_tables")  # pool "compute" (assets/interactions.py)

# (d_model, vocabulary) of the models the registry names; an unknown model gets the largest request.
MODEL_DIMS = {
    "google/gemma-2-2b": (2304, 256000),
    "google/gemma-2-9b": (3584, 256000),
    "meta-llama/Llama-3.1-8B": (4096, 128256),
    "google/gemma-3-1b-pt": (1152, 262144),
}
WIDTHS = {"k": 1024, "m": 1024 * 1024}
WORKSPACE_GIB = 2  # chunked logits, top-k buffers, CUDA context
LARGEST_GPU_MIB = 80 * 1024
# Labels from NVIDIA GPU feature discovery (the GPU operator sets them on every GPU node).
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"


def sae_width(ref, d_model: int) -> int:
    """d_sae: from the width in the SAE id (16k, 1m), else the expansion factor in the release id (8x)."""
    if ref.width:
        number, unit = re.fullmatch(r"(\d+)([km]?)", ref.width.lower()).groups()
        return int(number) * WIDTHS.get(unit, 1)
    expansion = re.search(r"(\d+)x", ref.release)
    return int(expansion.group(1)) * d_model if expansion else 32 * d_model


def weights_gib(key: str) -> float | None:
    """float32 GiB one interaction step holds on its device: the SAE's encoder and decoder and the
    model's embedding and unembedding (counted twice even when tied: normalised copies), plus workspace.
    None for a planted release (tiny, CPU) and for a model not in ``MODEL_DIMS``."""
    ref = parse_key(key)
    release = get_release(ref.release)
    if release.generated:
        return None
    if release.model_repo not in MODEL_DIMS:
        return None
    d_model, vocab = MODEL_DIMS[release.model_repo]
    floats = 2 * sae_width(ref, d_model) * d_model + 2 * vocab * d_model
    return floats * 4 / 2**30 + WORKSPACE_GIB


def step_k8s_config(key: str) -> dict:
    """Kubernetes config of one SAE's interaction-step pods (dagster-k8s ``UserDefinedDagsterK8sConfig``):
    one GPU with at least 1.25× the estimated memory (node affinity on the GPU-memory label), host memory
    for loading the weights, GPU-node tolerations. Planted releases: a small CPU pod."""
    need = weights_gib(key)
    if need is None and get_release(parse_key(key).release).generated:
        return {
            "container_config": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}}
        }
    gpu_mib = LARGEST_GPU_MIB - 1024 if need is None else min(math.ceil(1.25 * need * 1024), LARGEST_GPU_MIB - 1024)
    host_gib = 64 if need is None else max(16, math.ceil(1.5 * need))
    return {
        "container_config": {
            "resources": {
                "requests": {"cpu": "4", "memory": f"{host_gib}Gi", "nvidia.com/gpu": "1"},
                "limits": {"memory": f"{host_gib}Gi", "nvidia.com/gpu": "1"},
            },
        },
        "pod_spec_config": {
            "affinity": {
                "node_affinity": {
                    "required_during_scheduling_ignored_during_execution": {
                        "node_selector_terms": [
                            {
                                "match_expressions": [
                                    {"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(gpu_mib)]}
                                ]
                            }
                        ]
                    }
                }
            },
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def run_config_for_partition(key: str) -> dict:
    """The k8s executor's per-step config for this SAE, and the engine on the GPU (CPU for planted SAEs)."""
    generated = get_release(parse_key(key).release).generated
    return {
        "execution": {"config": {"per_step_k8s_config": {step: step_k8s_config(key) for step in GPU_STEPS}}},
        "resources": {"compute": {"config": {"device": "cpu" if generated else "cuda"}}},
    }


def tags_for_partition(key: str) -> dict[str, str]:
    need = weights_gib(key)
    return {"weightlens/gpu-gib": "none" if need is None else f"{need:.1f}"}


sae_chain_k8s = dg.define_asset_job(
    sae_chain_job.name,
    selection=dg.AssetSelection.assets(*SAE_ASSETS),
    description=(
        "Weights → lenses and attention circuits → feature classes for one SAE; "
        "interaction steps on a GPU pod sized for the SAE."
    ),
    config=dg.PartitionedConfig(
        partitions_def=sae_partitions,
        run_config_for_partition_key_fn=run_config_for_partition,
        tags_for_partition_key_fn=tags_for_partition,
    ),
    executor_def=k8s_job_executor,
)

defs = dg.Definitions(
    assets=ALL_ASSETS,
    jobs=[sae_chain_k8s, report_job],
    # The release sensor and schedule, pointed at the GPU-sized job (same name, same run requests).
    sensors=[sae_release_sensor.with_updated_job(sae_chain_k8s)],
    schedules=[sae_release_schedule.with_updated_job(sae_chain_k8s)],
    resources=resources(),
    executor=k8s_job_executor,  # the report job's steps: pods too
)


def prefetch(release_ids: list[str]) -> None:
    """Stage the model files of these releases in this machine's hub cache (``HF_HUB_CACHE``): run once per
    GPU node by deploy/k8s/prefetch-daemonset.yaml, so step pods find the weights on the node's volume."""
    from core.weights.discovery import fetch_model
    from core.weights.hub import Hub

    for release_id in release_ids:
        snapshot, checkpoint = fetch_model(release_id, Hub())
        print(f"{release_id}: {get_release(release_id).model_repo} staged in {snapshot.root}", flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "prefetch":
        raise SystemExit("usage: python -m orchestration.k8s prefetch RELEASE [RELEASE ...]")
    prefetch(sys.argv[2:])
