"""Fixtures over ``sglang_objects``: real SGLang 0.5.17 objects on CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("kvtier_test_sglang_objects", Path(__file__).with_name("sglang_objects.py"))
sglang_objects = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sglang_objects)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return sglang_objects.tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def base_server_args(tiny_llama_dir):
    return sglang_objects.server_args(tiny_llama_dir)


@pytest.fixture
def make_build_context(base_server_args):
    """Builds a real ``TreeCacheBuildContext`` over real CPU pools, as SGLang's scheduler would."""
    return lambda **kw: sglang_objects.build_context(base_server_args, **kw)
