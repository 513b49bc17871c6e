"""Server settings, from environment variables prefixed LLM2SLM_ (pydantic-settings)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from jobs.results import REGISTRY_NAME, REGISTRY_NAMESPACE


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM2SLM_", extra="ignore")

    storage_root: str = Field(
        default_factory=lambda: os.path.abspath("llm2slm-storage"),
        description="Job configs, checkpoints, artifacts and the registry: a shared folder "
        "or s3://bucket/prefix (S3 settings: LLM2SLM_S3_ENDPOINT_URL and the AWS_* variables).",
    )
    ray_dashboard_address: str = Field(
        "http://127.0.0.1:8265", description="Ray dashboard (job API) of the training cluster."
    )
    max_concurrent_jobs: int = Field(
        2, ge=0, le=10_000, description="Jobs running at once; 0 pauses starting (jobs queue)."
    )
    api_token: SecretStr | None = Field(
        None, description="When set, every endpoint but /healthz needs 'Authorization: Bearer'."
    )
    allow_hub_models: bool = Field(True, description="Accept Hugging Face Hub ids for models.")
    allow_hub_datasets: bool = Field(True, description="Accept Hugging Face Hub dataset ids.")
    allowed_local_roots: list[str] = Field(
        default_factory=list, description="Folders under which local model/data paths may lie."
    )
    trust_remote_code: bool = Field(False, description="Server-wide; never from a request.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest accepted request body.")
    max_steps_limit: int = Field(1_000_000, ge=1, description="Largest max_steps accepted.")
    max_workers_limit: int = Field(64, ge=1, description="Largest num_workers accepted.")
    registry_name: str = Field(REGISTRY_NAME)
    namespace: str = Field(REGISTRY_NAMESPACE, description="Ray namespace of the registry actor.")
    poll_interval_s: float = Field(1.0, gt=0, le=60, description="Registry scheduling period.")
    job_env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables for training jobs."
    )
    working_dir: str | None = Field(
        None, description="runtime_env working_dir for jobs; None when the code is installed."
    )

    @property
    def registry_spec(self) -> str:
        return f"{self.namespace}/{self.registry_name}"

    def local_roots(self) -> list[Path]:
        return [Path(r).resolve() for r in self.allowed_local_roots]
