"""Shared code of ``launch.prefill`` and ``launch.decode``: an SGLang server in one PD role, kvtier on.

The launchers take kvtier's own flags (``--kvtier-config``, ``--bootstrap-port``), check the config
before SGLang starts, prepend the flags that make the server a kvtier PD worker
(``--disaggregation-mode ROLE --disaggregation-transfer-backend kvtier
--disaggregation-bootstrap-port N``, and on a prefill server ``--radix-cache-backend kvtier``) and
hand every other argument to SGLang unchanged, after loading SGLang's plugins as
``sglang.launch_server`` does. A user argument
that sets one of those flags to another value is refused with a message naming what to remove.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

from kvtier.sglang_ext.config import CONFIG_ENV, ConfigError, load_config

ROLES = ("prefill", "decode")
BACKEND = "kvtier"
DEFAULT_BOOTSTRAP_PORT = 8998

# dest in SGLang's ServerArgs -> the flag that sets it, for the flags a launcher owns.
OWNED_FLAGS = {
    "disaggregation_mode": "--disaggregation-mode",
    "disaggregation_transfer_backend": "--disaggregation-transfer-backend",
    "disaggregation_bootstrap_port": "--disaggregation-bootstrap-port",
    "radix_cache_backend": "--radix-cache-backend",
}
_HINTS = {
    "disaggregation_transfer_backend": "to serve with another PD backend run python -m sglang.launch_server",
    "disaggregation_bootstrap_port": "give the port with --bootstrap-port N",
    "radix_cache_backend": "a kvtier PD worker always uses kvtier's cache",
}


class LaunchError(ValueError):
    """A launcher argument is wrong or conflicts with the role; the message says what to change."""


@dataclass(frozen=True)
class LaunchOptions:
    """What a launcher parsed: kvtier's flags, and the arguments that go to SGLang."""

    role: str
    kvtier_config: Optional[str]
    bootstrap_port: int
    sglang_args: list[str]


def arg_parser(role: str) -> argparse.ArgumentParser:
    """The launcher's own flags; ``--help`` lists them and says where the rest go."""
    ap = argparse.ArgumentParser(
        prog=f"python -m launch.{role}",
        usage=f"python -m launch.{role} [--kvtier-config PATH] [--bootstrap-port N] SGLANG_ARGS...",
        description=f"Start an SGLang {role} server of a PD pair with kvtier's transfer backend and cache.",
        epilog=(
            "Every other argument goes to SGLang unchanged (python -m sglang.launch_server --help "
            f"lists them). launch.{role} adds --disaggregation-mode {role} "
            f"--disaggregation-transfer-backend {BACKEND} --disaggregation-bootstrap-port N"
            + (f" --radix-cache-backend {BACKEND}" if role == "prefill" else "")
            + ", and refuses those flags with other values. When "
            "SGLANG_HOST_IP is unset and the server listens on loopback, it is set to 127.0.0.1."
        ),
        allow_abbrev=False,  # an abbreviation of an SGLang flag must reach SGLang, not match ours
    )
    ap.add_argument("--kvtier-config", metavar="PATH", default=None,
                    help=f"kvtier YAML config (sets {CONFIG_ENV}); checked before SGLang starts")
    ap.add_argument("--bootstrap-port", "--disaggregation-bootstrap-port", dest="bootstrap_port",
                    type=int, default=DEFAULT_BOOTSTRAP_PORT, metavar="N",
                    help="PD bootstrap port: the prefill server listens there, a decode server falls "
                         "back to it when a request names none; give both the same "
                         f"(default {DEFAULT_BOOTSTRAP_PORT})")
    return ap


def parse_args(role: str, argv: list[str]) -> LaunchOptions:
    """Split ``argv`` into kvtier's flags and SGLang's arguments (order kept)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    ap = arg_parser(role)
    ns, rest = ap.parse_known_args(argv)
    if not 0 < ns.bootstrap_port < 65536:
        ap.error(f"--bootstrap-port {ns.bootstrap_port} is not a TCP port (1-65535)")
    return LaunchOptions(role, ns.kvtier_config, ns.bootstrap_port, rest)


def role_flags(role: str, bootstrap_port: int) -> list[str]:
    """The flags a launcher puts in front of the user's SGLang arguments."""
    flags = [
        "--disaggregation-mode", role,
        "--disaggregation-transfer-backend", BACKEND,
        "--disaggregation-bootstrap-port", str(bootstrap_port),
    ]
    if role == "prefill":
        # SGLang runs a decode server without a radix cache (kvtier's cache needs one); the
        # tiers pay off where prompts are prefilled.
        flags += ["--radix-cache-backend", BACKEND]
    return flags


def option_index(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of ``parser`` (SGLang's) mapped to the dest it sets."""
    return {opt: action.dest for action in parser._actions for opt in action.option_strings}


def _resolve(token: str, index: Mapping[str, str]) -> Optional[str]:
    """The dest ``--opt`` or ``--opt=value`` sets, with argparse's unique-prefix abbreviations."""
    opt = token.split("=", 1)[0]
    if opt in index:
        return index[opt]
    dests = {dest for name, dest in index.items() if name.startswith(opt)}
    return dests.pop() if len(dests) == 1 else None


def find_option(args: list[str], dest: str, index: Mapping[str, str]) -> list[tuple[str, Optional[str]]]:
    """Each place in ``args`` that sets ``dest``: (the flag as written, its value or None)."""
    found = []
    for i, token in enumerate(args):
        if not token.startswith("--") or _resolve(token, index) != dest:
            continue
        if "=" in token:
            flag, value = token.split("=", 1)
        else:
            flag, value = token, (args[i + 1] if i + 1 < len(args) else None)
        found.append((flag, value))
    return found


def build_server_argv(opts: LaunchOptions, index: Mapping[str, str]) -> list[str]:
    """SGLang's argv for this role: the role flags, then the user's arguments unchanged.

    ``index`` is ``option_index`` of SGLang's parser, so abbreviations are recognised as SGLang
    would. A user argument repeating a role flag with the same value is kept; another value is
    refused.
    """
    owned = dict(zip(OWNED_FLAGS, role_flags(opts.role, opts.bootstrap_port)[1::2]))
    for dest, ours in owned.items():
        for flag, value in find_option(opts.sglang_args, dest, index):
            if value == ours:
                continue
            hint = _HINTS.get(dest)
            if dest == "disaggregation_mode" and value in ROLES:
                hint = f"for a {value} server run python -m launch.{value}"
            written = flag if value is None else f"{flag} {value}"
            raise LaunchError(
                f"launch.{opts.role} sets {OWNED_FLAGS[dest]} {ours} itself; remove '{written}' "
                "from the command line" + (f" ({hint})" if hint else "")
            )
    return role_flags(opts.role, opts.bootstrap_port) + list(opts.sglang_args)


def check_config(path: Optional[str], env: Mapping[str, str]) -> Optional[str]:
    """Validate the kvtier config (``path``, else ``$KVTIER_CONFIG``, plus ``KVTIER_*``); its absolute path."""
    try:
        load_config(path, env=env)
    except ConfigError as exc:
        where = f"--kvtier-config {path}" if path else f"{CONFIG_ENV}={env.get(CONFIG_ENV, '')!r} / KVTIER_* variables"
        raise LaunchError(f"{where}: {exc}") from exc
    return os.path.abspath(path) if path else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_env(
    config_path: Optional[str], sglang_args: list[str], index: Mapping[str, str], env: Mapping[str, str]
) -> dict[str, str]:
    """Environment variables to set before SGLang starts: the checked config path, the host IP."""
    out = {CONFIG_ENV: config_path} if config_path else {}
    hosts = [v for _, v in find_option(sglang_args, "host", index) if v is not None]
    # SGLang otherwise advertises the first non-loopback address it finds for its rank and
    # bootstrap sockets, which a server bound to loopback cannot be reached at.
    if not env.get("SGLANG_HOST_IP") and _is_loopback(hosts[-1] if hosts else "127.0.0.1"):
        out["SGLANG_HOST_IP"] = "127.0.0.1"
    return out


def main(role: str, argv: Optional[list[str]] = None) -> None:
    """Run an SGLang server in ``role`` with kvtier on; errors exit with a message, not a traceback."""
    opts = parse_args(role, sys.argv[1:] if argv is None else argv)
    prog = f"python -m launch.{role}"
    try:
        config_path = check_config(opts.kvtier_config, os.environ)  # before SGLang's slow import
    except LaunchError as exc:
        sys.exit(f"{prog}: error: {exc}")

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import DISAGG_TRANSFER_BACKEND_CHOICES, ServerArgs, prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    if BACKEND not in DISAGG_TRANSFER_BACKEND_CHOICES:
        sys.exit(f"{prog}: error: SGLang has no '{BACKEND}' PD transfer backend after loading plugins: "
                 "install kvtier (pip install -e .) and, if SGLANG_PLUGINS is set, include kvtier in it")
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    index = option_index(parser)
    try:
        os.environ.update(server_env(config_path, opts.sglang_args, index, os.environ))
        server_argv = build_server_argv(opts, index)
    except LaunchError as exc:
        sys.exit(f"{prog}: error: {exc}")
    server_args = prepare_server_args(server_argv)
    if server_args.tokenizer_worker_num != 1:
        # Extra tokenizer workers never load plugins, so they cannot resolve the kvtier backend.
        sys.exit(f"{prog}: error: --tokenizer-worker-num {server_args.tokenizer_worker_num} is not "
                 "supported with the kvtier PD backend; leave it at 1")
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)
