"""Config: YAML, environment overrides, and errors that name the key and the fix."""

from __future__ import annotations

import pytest

from kvtier.sglang_ext.config import ConfigError, KVTierConfig, check_page_size, load_config


def test_defaults_without_file_or_env():
    cfg = load_config(env={})
    assert cfg == KVTierConfig()
    assert cfg.chunk_tokens == 256 and cfg.write_policy == "write_back" and cfg.disk_path == ""


def test_yaml_then_env_then_overrides(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text(
        "chunk_tokens: 512\ncpu_size_gb: 2\ndisk_path: /tmp/kv\ndisk_size_gb: 10\nwrite_policy: write_through\n"
    )
    env = {"KVTIER_CONFIG": str(path), "KVTIER_CPU_SIZE_GB": "4.5", "KVTIER_DISK_O_DIRECT": "false"}
    cfg = load_config(env=env, metrics_port=9400)
    assert cfg.chunk_tokens == 512
    assert cfg.cpu_size_gb == 4.5 and cfg.cpu_bytes == 4_500_000_000
    assert cfg.disk_path == "/tmp/kv" and cfg.disk_bytes == 10_000_000_000
    assert cfg.disk_o_direct is False
    assert cfg.write_policy == "write_through"
    assert cfg.metrics_port == 9400


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text("chunk_token: 128\n")
    with pytest.raises(ConfigError, match=r"did you mean 'chunk_tokens'"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match=r"KVTIER_CPU_SIZE"):
        load_config(env={"KVTIER_CPU_SIZE": "3"})


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"chunk_tokens": 0}, "chunk_tokens"),
        ({"cpu_size_gb": 0}, "cpu_size_gb"),
        ({"disk_path": "/tmp/x"}, "disk_size_gb"),
        ({"disk_size_gb": 5}, "disk_path"),
        ({"write_policy": "write_sometimes"}, "write_policy"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"remote_url": "memcached://h:1"}, "remote_url"),
        ({"pin_timeout_s": 0}, "pin_timeout_s"),
        ({"remote_write_queue": 0}, "remote_write_queue"),
        ({"lower_tier_wait_s": -1}, "lower_tier_wait_s"),
        ({"spill_max_programs": -1}, "spill_max_programs"),
        ({"spill_ahead": 1.0}, "spill_ahead"),
        ({"pd_switch_interval_ms": -1}, "pd_switch_interval_ms"),
        ({"spill_ahead": -0.1}, "spill_ahead"),
        ({"load_max_programs": -2}, "load_max_programs"),
        ({"load_layer_groups": -1}, "load_layer_groups"),
    ],
)
def test_invalid_values_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=rf"kvtier setting {key}="):
        load_config(env={}, **changes)


def test_wrong_types_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"'chunk_tokens' must be int"):
        load_config(env={"KVTIER_CHUNK_TOKENS": "many"})
    path = tmp_path / "kvtier.yaml"
    path.write_text("disk_o_direct: 3\n")
    with pytest.raises(ConfigError, match=r"'disk_o_direct' must be bool"):
        load_config(path, env={})


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, env={})


def test_chunk_must_hold_whole_pages():
    cfg = load_config(env={}, chunk_tokens=100)
    check_page_size(cfg, 1)
    check_page_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"not a multiple of SGLang's --page-size 64; use e.g. chunk_tokens: 64"):
        check_page_size(cfg, 64)


def test_the_documented_example_config_loads():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "kvtier.yaml"
    cfg = load_config(example, env={})
    assert cfg.cpu_size_gb == 30 and cfg.disk_size_gb == 200 and cfg.metrics_port == 9400
    # It documents every setting, and shows the defaults except where it sets up a tier or metrics:
    # a default changed in code but not here would hand users the old behaviour.
    import dataclasses

    import yaml

    written = yaml.safe_load(example.read_text())
    fields = {f.name for f in dataclasses.fields(KVTierConfig)}
    assert set(written) == fields
    set_up = {"cpu_size_gb", "disk_path", "disk_size_gb", "metrics_port"}
    assert {k for k in fields if getattr(cfg, k) != getattr(KVTierConfig(), k)} == set_up


def test_pd_keys_default_parse_and_validate():
    cfg = load_config(env={})
    assert (cfg.pd_transport, cfg.pd_stage_slots, cfg.pd_stage_slot_mb) == ("auto", 4, 32.0)
    assert cfg.pd_timeout_s == 30.0 and cfg.pd_model_id == ""
    env = {"KVTIER_PD_TRANSPORT": "zmq", "KVTIER_PD_STAGE_SLOTS": "2", "KVTIER_PD_STAGE_SLOT_MB": "0.5",
           "KVTIER_PD_MODEL_ID": "llama-8b"}
    cfg = load_config(env=env)
    assert (cfg.pd_transport, cfg.pd_stage_slots, cfg.pd_stage_slot_mb, cfg.pd_model_id) == ("zmq", 2, 0.5, "llama-8b")
    for changes, key in (({"pd_transport": "ucx"}, "pd_transport"), ({"pd_stage_slots": 0}, "pd_stage_slots"),
                         ({"pd_stage_slot_mb": 0}, "pd_stage_slot_mb"), ({"pd_timeout_s": -1}, "pd_timeout_s")):
        with pytest.raises(ConfigError, match=key):
            load_config(env={}, **changes)
