"""Runs on Kubernetes: the pod each model job's run gets from Dagster's K8sRunLauncher.

Every run is its own pod (deploy/dagster/values.yaml sets the launcher and the default pod
size for all runs). The jobs that train or evaluate models (train, evaluate, retrain) carry
the ``dagster-k8s/config`` tag built here: bigger CPU pods by default, or a pod on a GPU node
with ``REFINERY_RUN_GPUS`` (default 1) ``nvidia.com/gpu`` when the code location runs with
``REFINERY_RUN_ACCELERATOR=gpu`` (deploy/dagster/values-gpu.yaml sets both). Locally the tag is inert: the default run launcher starts each run as a local process.

Job tags are fixed when a job is defined, so the accelerator is read once, when the
definitions load (``RunSettings``, passed to :func:`model_job_tags`); both functions are pure.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from refinery.core.settings import RunSettings

K8S_CONFIG_TAG = "dagster-k8s/config"
Accelerator = Literal["cpu", "gpu"]
ACCELERATORS: tuple[Accelerator, ...] = ("cpu", "gpu")

# What a model run needs (SmolLM2-135M LoRA peaks at 2.3 GiB on CPU; the evaluation loads
# challenger and champion side by side); a larger base model needs larger figures.
CPU_POD = {"requests": {"cpu": "4", "memory": "12Gi"}, "limits": {"cpu": "8", "memory": "16Gi"}}
GPU_POD = {"requests": {"cpu": "4", "memory": "24Gi"}, "limits": {"cpu": "8", "memory": "32Gi"}}
GPU_NODE_SELECTOR = {"refinery.dev/accelerator": "nvidia-gpu"}
GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def run_pod_config(accelerator: Accelerator, gpus: int = 1) -> dict[str, Any]:
    """The K8sRunLauncher's per-run config (container and pod spec) for a model job."""
    if accelerator not in ACCELERATORS:
        raise ValueError(f"accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
    if accelerator == "cpu":
        return {"container_config": {"resources": CPU_POD}}
    if gpus < 1:
        raise ValueError(f"a GPU run needs at least one GPU, got {gpus}")
    # The training code picks CUDA when it sees it (LoRA `device: auto`).
    resources = {k: {**v, "nvidia.com/gpu": str(gpus)} for k, v in GPU_POD.items()}
    return {
        "container_config": {"resources": resources},
        "pod_spec_config": {
            "node_selector": GPU_NODE_SELECTOR,
            "tolerations": GPU_TOLERATIONS,
        },
    }


def model_job_tags(settings: RunSettings) -> dict[str, str]:
    """The ``dagster-k8s/config`` tag for model jobs, for the accelerator the settings name
    (``REFINERY_RUN_ACCELERATOR``: cpu, the default, or gpu; ``REFINERY_RUN_GPUS``: 1; a GPU
    run trains with ``processes`` = this many)."""
    config = run_pod_config(settings.run_accelerator, settings.run_gpus)
    return {K8S_CONFIG_TAG: json.dumps(config, sort_keys=True)}
