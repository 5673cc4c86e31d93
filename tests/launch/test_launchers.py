"""``launch.prefill`` / ``launch.decode``: argv building against SGLang 0.5.17's real parser, config checks, --help."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.launch.server import (
    BACKEND,
    LaunchError,
    build_server_argv,
    check_config,
    option_index,
    parse_args,
    role_flags,
    server_env,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sglang_parser() -> argparse.ArgumentParser:
    """SGLang's own server parser, with the backend name kvtier's plugin registers."""
    from sglang.srt.server_args import DISAGG_TRANSFER_BACKEND_CHOICES, ServerArgs, add_disagg_transfer_backend_choices

    if BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        add_disagg_transfer_backend_choices([BACKEND])
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.fixture(scope="module")
def index(sglang_parser) -> dict[str, str]:
    return option_index(sglang_parser)


def test_kvtier_flags_are_taken_and_the_rest_kept_in_order():
    opts = parse_args("prefill", ["--model-path", "m", "--kvtier-config=/c.yaml", "--tp", "2",
                                  "--bootstrap-port", "9000", "--mem-fraction-static", "0.35"])
    assert (opts.role, opts.kvtier_config, opts.bootstrap_port) == ("prefill", "/c.yaml", 9000)
    assert opts.sglang_args == ["--model-path", "m", "--tp", "2", "--mem-fraction-static", "0.35"]
    # SGLang's own name for the port is accepted as ours; the default is SGLang's.
    assert parse_args("decode", ["--disaggregation-bootstrap-port", "9100"]).bootstrap_port == 9100
    assert parse_args("decode", []).bootstrap_port == 8998
    # No abbreviation of ours swallows an SGLang flag.
    assert parse_args("decode", ["--boot", "1"]).sglang_args == ["--boot", "1"]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_role_flags_come_first_and_sglang_parses_them(role, sglang_parser, index):
    user = ["--model-path", "/models/x", "--port", "30001", "--radix-cache-backend", "kvtier"]
    argv = build_server_argv(parse_args(role, user + ["--bootstrap-port", "9001"]), index)
    assert argv == role_flags(role, 9001) + user
    ns = sglang_parser.parse_args(argv)
    assert (ns.disaggregation_mode, ns.disaggregation_transfer_backend, ns.disaggregation_bootstrap_port,
            ns.radix_cache_backend, ns.model_path, ns.port) == (role, BACKEND, 9001, BACKEND, "/models/x", 30001)


@pytest.mark.parametrize("role, user, message", [
    ("prefill", ["--disaggregation-mode", "decode"],
     "sets --disaggregation-mode prefill itself; remove '--disaggregation-mode decode' from the command line "
     "(for a decode server run python -m launch.decode)"),
    ("decode", ["--disaggregation-mode=null"], "remove '--disaggregation-mode null'"),
    ("prefill", ["--disaggregation-m", "decode"], "remove '--disaggregation-m decode'"),  # SGLang's abbreviation
    ("decode", ["--disaggregation-transfer-backend", "mooncake"], "run python -m sglang.launch_server"),
    ("prefill", ["--radix-cache-backend", "other"], "always uses kvtier's cache"),
    ("prefill", ["--disaggregation-bootstrap", "1234"], "give the port with --bootstrap-port N"),
    ("decode", ["--model-path", "m", "--disaggregation-mode"], "remove '--disaggregation-mode' from"),
])
def test_conflicting_arguments_are_refused(role, user, message, index):
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_server_argv(parse_args(role, user), index)


def test_config_is_checked_with_a_message_naming_the_fix(tmp_path):
    good = tmp_path / "kvtier.yaml"
    good.write_text("chunk_tokens: 128\ncpu_size_gb: 1\n")
    assert check_config(str(good), env={}) == str(good)
    assert check_config(None, env={}) is None
    with pytest.raises(LaunchError, match="--kvtier-config .*missing.yaml: kvtier config file .* does not exist"):
        check_config(str(tmp_path / "missing.yaml"), env={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("chunk_token: 128\n")
    with pytest.raises(LaunchError, match="did you mean 'chunk_tokens'"):
        check_config(str(typo), env={})
    with pytest.raises(LaunchError, match="KVTIER_CONFIG=.*cpu_size_gb=-1.0: must be > 0"):
        check_config(None, env={"KVTIER_CONFIG": str(good), "KVTIER_CPU_SIZE_GB": "-1"})


def test_environment_for_the_server(index):
    assert server_env("/abs/c.yaml", ["--model-path", "m"], index, {}) == {
        "KVTIER_CONFIG": "/abs/c.yaml", "SGLANG_HOST_IP": "127.0.0.1"}
    assert server_env(None, ["--host", "localhost"], index, {}) == {"SGLANG_HOST_IP": "127.0.0.1"}
    assert server_env(None, ["--host=0.0.0.0"], index, {}) == {}
    assert server_env(None, ["--host", "127.0.0.1"], index, {"SGLANG_HOST_IP": "10.1.2.3"}) == {}


@pytest.mark.parametrize("module, cwd", [("kvtier.launch.prefill", "/"), ("launch.decode", str(REPO))])
def test_help_names_kvtier_flags(module, cwd):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=cwd,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    role = module.rsplit(".", 1)[1]
    for text in ("--kvtier-config PATH", "--bootstrap-port N", "Every other argument goes to SGLang unchanged",
                 f"--disaggregation-mode {role}"):
        assert text in " ".join(out.stdout.split()), out.stdout


def test_a_bad_config_stops_the_launcher_before_sglang_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("write_policy: sometimes\n")
    # -X importtime lists every module the process imported (on stderr, one "import time:" line each).
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "kvtier.launch.decode", "--kvtier-config",
                          str(bad), "--model-path", "m"], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if not k.startswith("KVTIER_")})
    assert out.returncode == 1
    assert "python -m launch.decode: error: --kvtier-config" in out.stderr
    assert "write_policy='sometimes': must be one of ['write_back', 'write_through']" in out.stderr
    assert "Traceback" not in out.stderr
    imported = [line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "kvtier.launch.server" in imported  # the listing works: the launcher's own module is in it
    assert not [m for m in imported if m == "sglang" or m.startswith("sglang.")]
