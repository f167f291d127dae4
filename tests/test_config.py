"""FastKVConfig: defaults, sources and their precedence, and errors that name the field."""

from __future__ import annotations

import pytest

from vllm_fastkv.config import FastKVConfig, FastKVConfigError


def test_defaults_are_the_papers():
    cfg = FastKVConfig.from_sources({}, environ={})
    assert (cfg.tsp_rate, cfg.retain_rate, cfg.window, cfg.pool_kernel) == (0.2, 0.1, 8, 7)
    assert (cfg.pooling, cfg.mode, cfg.enabled) == ("avg", "proportional", True)
    # The paper's tsp_layer=15 for Llama-3.1-8B's 32 layers is the middle-layer default.
    assert cfg.resolved_for_model(32).tsp_layer == 15


def test_precedence_additional_config_over_env_over_defaults():
    env = {"VLLM_FASTKV_RETAIN_RATE": "0.3", "VLLM_FASTKV_POOLING": "max", "PATH": "/bin"}
    cfg = FastKVConfig.from_sources({"fastkv": {"retain_rate": 0.05}}, environ=env)
    assert cfg.retain_rate == 0.05
    assert cfg.pooling == "max"
    assert FastKVConfig.from_sources({}, environ={"VLLM_FASTKV_ENABLED": "false"}).enabled is False


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"tsp_rate": 0.0}, "fastkv.tsp_rate"),
        ({"tsp_rate": 1.01}, "fastkv.tsp_rate"),
        ({"retain_rate": -0.1}, "fastkv.retain_rate"),
        ({"window": 0}, "fastkv.window"),
        ({"pool_kernel": 6}, "pool_kernel"),
        ({"pooling": "sum"}, "fastkv.pooling"),
        ({"mode": "adaptive"}, "fastkv.mode"),
        ({"mode": "constant", "max_capacity_prompt": 8}, "max_capacity_prompt"),
        ({"tsp_layer": -1}, "fastkv.tsp_layer"),
        ({"retain": 0.1}, "fastkv.retain"),
        ({"kv_bits": 3}, "fastkv.kv_bits"),
        ({"kv_group_size": 0}, "fastkv.kv_group_size"),
        ({"kv_bits": 2, "kv_group_size": 8}, "kv_group_size"),
        ({"kv_residual": -1}, "fastkv.kv_residual"),
        ({"evicted_bits": 3}, "fastkv.evicted_bits"),
        ({"evicted_bits": 2, "tsp_rate": 1.0, "kv_bits": 4}, "kv_bits 16"),
        ({"evicted_bits": 2}, "tsp_rate 1.0"),
        ({"evicted_bits": 2, "tsp_rate": 1.0, "kv_group_size": 8}, "kv_group_size"),
    ],
)
def test_invalid_values_name_the_field(section, field):
    with pytest.raises(FastKVConfigError) as err:
        FastKVConfig.from_sources({"fastkv": section}, environ={})
    assert field in str(err.value)
    assert str(err.value).startswith("Invalid FastKV setting")


def test_section_must_be_an_object():
    with pytest.raises(FastKVConfigError, match="additional_config.fastkv"):
        FastKVConfig.from_sources({"fastkv": [0.2]}, environ={})


def test_unknown_env_var_is_an_error():
    with pytest.raises(FastKVConfigError, match="VLLM_FASTKV_TSP"):
        FastKVConfig.from_sources({}, environ={"VLLM_FASTKV_TSP": "3"})


@pytest.mark.parametrize(
    ("num_layers", "tsp_layer", "ok"),
    [(4, 2, True), (4, 3, False), (32, 31, False), (32, 30, True)],
)
def test_tsp_layer_must_leave_a_later_layer(num_layers, tsp_layer, ok):
    cfg = FastKVConfig.from_sources({"fastkv": {"tsp_layer": tsp_layer}}, environ={})
    if ok:
        assert cfg.resolved_for_model(num_layers).tsp_layer == tsp_layer
    else:
        with pytest.raises(FastKVConfigError, match="fastkv.tsp_layer"):
            cfg.resolved_for_model(num_layers)


def test_budgets():
    cfg = FastKVConfig.from_sources({}, environ={})
    assert cfg.retention_budget(32768) == 3276
    assert cfg.propagation_budget(32768) == 6553
    assert cfg.retention_budget(40) == 8  # never below the window
    assert cfg.retention_budget(5) == 5  # never above the prompt
    const = FastKVConfig.from_sources({"fastkv": {"mode": "constant"}}, environ={})
    assert const.retention_budget(32768) == 512
    assert const.propagation_budget(32768) == 2048
    assert const.retention_budget(300) == 300
    off = FastKVConfig.from_sources({"fastkv": {"enabled": False}}, environ={})
    assert off.retention_budget(32768) == 32768
    assert not off.compresses
    assert not FastKVConfig.validated({"tsp_rate": 1.0, "retain_rate": 1.0}).compresses
    assert cfg.compresses
    assert not cfg.quantizes and FastKVConfig.validated({"kv_bits": 2}).quantizes
