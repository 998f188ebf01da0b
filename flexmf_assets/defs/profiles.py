"""Deployment profiles, selected by ``FLEXMF_PROFILE``: same code, different engines.

- ``local`` (default): the embedded instance (SQLite under DAGSTER_HOME), Parquet and models under
  ``data/storage``, the multiprocess executor.
"""

import os
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from flexmf_assets.errors import ConfigError
from flexmf_assets.project import ProjectConfig

PROFILE_ENV = "FLEXMF_PROFILE"
PROFILES = ("local",)


@dataclass(frozen=True)
class Profile:
    name: str
    storage_base: str  # local path or fsspec URL of the IO manager
    executor: dg.ExecutorDefinition
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: op tags of training steps (queues / GPU requests of the distributed executors)
    training_tags: dict[str, str] = field(default_factory=dict)


def select_profile(project: ProjectConfig, storage_dir: str | None = None,
                   env: dict[str, str] | None = None) -> Profile:
    env = dict(os.environ if env is None else env)
    name = env.get(PROFILE_ENV, "local").strip() or "local"
    if name == "local":
        return Profile("local", storage_dir or str(project.storage_dir), dg.multiprocess_executor)
    raise ConfigError(f"{PROFILE_ENV}: {name!r} is not one of {', '.join(PROFILES)}")
