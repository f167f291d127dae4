"""deploy/production-stack/values-fastkv.yaml: values for vLLM's production-stack chart.

That chart is not vendored here (CI is offline), so its rendering is not repeated in CI; the
file was rendered once against production-stack's chart when written. These tests pin what
makes the engines FASTKV engines: the backend flag in vllmConfig.extraArgs (the stack runs its
own `vllm serve`, bypassing the image's entrypoint), FastKV variables that the plugin's own
loader accepts, the token from a Secret, and the image's non-root user.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy import DEPLOY
from vllm_fastkv.config import ENV_PREFIX, FastKVConfig

VALUES = DEPLOY / "production-stack" / "values-fastkv.yaml"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def model_specs(values: dict[str, Any]) -> list[dict[str, Any]]:
    specs = values["servingEngineSpec"]["modelSpec"]
    assert specs, "no modelSpec entries"
    return specs


def test_documented_model_spec_keys(model_specs: list[dict[str, Any]]):
    for spec in model_specs:
        for key in ("name", "repository", "tag", "modelURL", "replicaCount", "requestCPU",
                    "requestMemory", "requestGPU", "vllmConfig", "env"):
            assert key in spec, f"{spec.get('name')}: missing {key}"
        assert spec["requestGPU"] >= 1
        assert isinstance(spec["tag"], str) and spec["tag"] != "latest"


def test_engines_select_fastkv(model_specs: list[dict[str, Any]]):
    for spec in model_specs:
        args = spec["vllmConfig"]["extraArgs"]
        assert args[args.index("--attention-backend") + 1] == "FASTKV"


def test_fastkv_env_is_what_the_plugin_accepts(model_specs: list[dict[str, Any]]):
    for spec in model_specs:
        env = {e["name"]: e["value"] for e in spec["env"] if e["name"].startswith(ENV_PREFIX)}
        assert env, f"{spec['name']}: no FastKV settings"
        config = FastKVConfig.from_sources(None, environ=env)
        assert config.enabled and config.compresses


def test_hf_token_from_an_existing_secret(model_specs: list[dict[str, Any]]):
    for spec in model_specs:
        # A string hf_token would be written into a Secret by the chart, i.e. live in values.
        assert set(spec["hf_token"]) == {"secretName", "secretKey"}
        assert all(e["name"] != "HF_TOKEN" for e in spec["env"])


def test_runs_as_the_image_user(values: dict[str, Any], image_uid: int):
    pod = values["servingEngineSpec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] == image_uid
    assert pod["fsGroup"] == image_uid  # HF_HOME is the stack's PVC at /data
    container = values["servingEngineSpec"]["containerSecurityContext"]
    assert container["allowPrivilegeEscalation"] is False
