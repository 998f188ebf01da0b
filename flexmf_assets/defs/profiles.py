"""Deployment profiles, selected by ``FLEXMF_PROFILE``: same code, different engines.

- ``local`` (default): the embedded instance (SQLite under DAGSTER_HOME), Parquet and models under
  ``data/storage``, the multiprocess executor.
- ``distributed``: instance storage in Postgres (configured in the instance's ``dagster.yaml``, see
  ``deploy/dagster.yaml``), steps on Celery workers behind a Redis broker (``dagster-celery``), every
  asset on an S3-compatible object store. Settings come from the environment:

  ========================  =====================================================================
  ``FLEXMF_STORAGE_URL``    required: ``s3://bucket/prefix`` (any fsspec URL) of the IO manager
  ``FLEXMF_S3_ENDPOINT``    endpoint of an S3-compatible store (MinIO, moto, Ceph); falls back to
                            ``AWS_ENDPOINT_URL``; unset: AWS S3. Credentials: the usual ``AWS_*``.
  ``FLEXMF_CELERY_BROKER``  Celery broker URL (default ``redis://127.0.0.1:6379/0``)
  ``FLEXMF_CELERY_BACKEND`` Celery result backend (default: the broker URL)
  ========================  =====================================================================

  Training steps on a CUDA device carry ``dagster-celery/queue: gpu`` (start GPU workers with
  ``-q gpu``) and a ``dagster-k8s/config`` tag requesting one ``nvidia.com/gpu`` (the k8s/celery-k8s
  executors turn it into the pod's resource limits). See docs/distributed.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import dagster as dg

from flexmf_assets.errors import ConfigError
from flexmf_assets.project import ProjectConfig

PROFILE_ENV = "FLEXMF_PROFILE"
PROFILES = ("local", "distributed")

STORAGE_URL_ENV = "FLEXMF_STORAGE_URL"
S3_ENDPOINT_ENV = "FLEXMF_S3_ENDPOINT"
BROKER_ENV = "FLEXMF_CELERY_BROKER"
BACKEND_ENV = "FLEXMF_CELERY_BACKEND"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

#: tag keys read by dagster-celery (queue routing) and dagster-k8s (pod spec of a step)
CELERY_QUEUE_TAG = "dagster-celery/queue"
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_QUEUE = "gpu"


@dataclass(frozen=True)
class Profile:
    name: str
    storage_base: str  # local path or fsspec URL of the IO manager
    executor: dg.ExecutorDefinition
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: op tags of training steps (queues / GPU requests of the distributed executors)
    training_tags: dict[str, str] = field(default_factory=dict)


def gpu_training_tags(gpus: int = 1) -> dict[str, str]:
    """Op tags placing a training step on the ``gpu`` Celery queue and on a k8s node with ``gpus`` GPUs."""
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}, "requests": {"nvidia.com/gpu": str(gpus)}}
    return {
        CELERY_QUEUE_TAG: GPU_QUEUE,
        K8S_CONFIG_TAG: json.dumps({"container_config": {"resources": resources}}, sort_keys=True),
    }


def celery_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The dagster-celery executor config (also the workers' ``-y`` file) from the environment."""
    broker = env.get(BROKER_ENV, "").strip() or DEFAULT_BROKER
    backend = env.get(BACKEND_ENV, "").strip() or broker
    for name, url in ((BROKER_ENV, broker), (BACKEND_ENV, backend)):
        if "://" not in url:
            raise ConfigError(f"{name}: {url!r} is not a URL (expected e.g. {DEFAULT_BROKER})")
    # one task per worker process at a time: a long training step never holds a second one hostage
    return {"broker": broker, "backend": backend, "config_source": {"worker_prefetch_multiplier": 1}}


def s3_storage(env: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """(IO manager base URL, fsspec storage options) from the environment."""
    url = env.get(STORAGE_URL_ENV, "").strip()
    if not url:
        raise ConfigError(f"{STORAGE_URL_ENV} is not set: the distributed profile needs an object store URL "
                          "such as s3://bucket/flexmf")
    if "://" not in url or url.startswith("file://"):
        raise ConfigError(f"{STORAGE_URL_ENV}: {url!r} is not a remote URL (expected s3://bucket/prefix); "
                          "workers on other machines cannot read a local path")
    options: dict[str, Any] = {}
    endpoint = env.get(S3_ENDPOINT_ENV, "").strip() or env.get("AWS_ENDPOINT_URL", "").strip()
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{S3_ENDPOINT_ENV}: {endpoint!r} is not an http(s) URL")
        options["endpoint_url"] = endpoint
    return url.rstrip("/"), options


#: steps fork from a server that has imported torch, GX and the code location once; the default
#: (spawn) re-imports them for every step, about 10 s each on 2 cores
LOCAL_EXECUTOR = dg.multiprocess_executor.configured(
    {"start_method": {"forkserver": {"preload_modules": [
        "torch", "polars", "great_expectations", "flexmf_assets.defs.definitions"]}}},
    name="multiprocess_forkserver",
)


def uses_cuda(project: ProjectConfig) -> bool:
    return str((project.device or {}).get("device", "auto")).startswith("cuda")


def select_profile(project: ProjectConfig, storage_dir: str | None = None,
                   env: Mapping[str, str] | None = None) -> Profile:
    env = dict(os.environ if env is None else env)
    name = env.get(PROFILE_ENV, "local").strip() or "local"
    if name == "local":
        return Profile("local", storage_dir or str(project.storage_dir), LOCAL_EXECUTOR)
    if name == "distributed":
        from dagster_celery import celery_executor  # the `distributed` extra

        base, options = s3_storage(env)
        executor = celery_executor.configured(celery_settings(env), name="flexmf_celery")
        tags = gpu_training_tags() if uses_cuda(project) else {}
        return Profile("distributed", base, executor, storage_options=options, training_tags=tags)
    raise ConfigError(f"{PROFILE_ENV}: {name!r} is not one of {', '.join(PROFILES)}")
