"""Chunk keys: deterministic across processes, prefix-chained, and namespaced."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvtier.sglang_ext.chunk_keys import KEY_BYTES


def test_only_whole_chunks_get_keys(namespace):
    tokens = list(range(64 * 3 + 10))
    keys = namespace.chunk_keys(tokens)
    assert len(keys) == 3 and all(len(k) == KEY_BYTES for k in keys)
    assert namespace.chunk_keys(tokens[:63]) == []


def test_keys_chain_the_whole_prefix(namespace):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 128_000, 64 * 4).tolist()
    b = a[:128] + [t + 1 for t in a[128:]]  # same first two chunks, then different
    ka, kb = namespace.chunk_keys(a), namespace.chunk_keys(b)
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]
    # The same chunk tokens after a different prefix give a different key.
    c = [t + 1 for t in a[:64]] + a[64:]
    assert namespace.chunk_keys(c)[1] != ka[1]
    # Keys of a prefix are a prefix of the keys.
    assert namespace.chunk_keys(a[:200]) == ka[:3]


def test_keys_known_for_a_prefix_are_continued_not_hashed_again(namespace):
    tokens = list(range(64 * 5 + 7))
    full = namespace.chunk_keys(tokens, "salt")
    known = namespace.chunk_keys(tokens[: 64 * 2 + 30], "salt")
    assert namespace.chunk_keys(tokens, "salt", known) == full
    # Only the chunks after the known ones are hashed: known keys are taken as they are.
    assert namespace.chunk_keys(tokens, "salt", [b"x" * 32])[1:] != full[1:]


def test_input_types_agree(namespace):
    tokens = list(range(1000, 1000 + 128))
    as_list = namespace.chunk_keys(tokens)
    assert namespace.chunk_keys(np.array(tokens, dtype=np.int32)) == as_list
    assert namespace.chunk_keys(tuple(tokens)) == as_list


@pytest.mark.parametrize(
    "field, value",
    [
        ("model", "other-model@main|q=|load=auto"),
        ("kv_dtype", "float8_e4m3fn"),
        ("layout", "mha-nhd:L2:H1:D64:V64:S0"),
        ("page_size", 32),
        ("tp_rank", 1),
        ("tp_size", 2),
        ("chunk_tokens", 32),
    ],
)
def test_every_namespace_field_changes_the_keys(namespace, field, value):
    tokens = list(range(128))
    other = dataclasses.replace(namespace, **{field: value})
    assert set(other.chunk_keys(tokens)).isdisjoint(namespace.chunk_keys(tokens))


def test_extra_key_separates_tenants(namespace):
    tokens = list(range(64))
    plain, empty, salted, other = (namespace.chunk_keys(tokens, e) for e in (None, "", "salt-a", "salt-b"))
    assert len({plain[0], empty[0], salted[0], other[0]}) == 4
    assert namespace.chunk_keys(tokens, "salt-a") == salted


def test_same_keys_in_a_fresh_interpreter_with_another_hash_seed(namespace):
    tokens = list(range(5, 5 + 64 * 2))
    script = (
        "import json,sys; from kvtier.sglang_ext.chunk_keys import KVNamespace;"
        "ns=KVNamespace(**json.loads(sys.argv[1]));"
        "print(','.join(k.hex() for k in ns.chunk_keys(list(range(5,133)), 'salt')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(dataclasses.asdict(namespace))],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    ).stdout.strip()
    assert out == ",".join(k.hex() for k in namespace.chunk_keys(tokens, "salt"))


def test_matches_the_documented_formula(namespace):
    """h_i = BLAKE2b-256(h_{i-1} || int64-LE tokens), seeded by the namespace digest and extra key."""
    canonical = json.dumps(dataclasses.asdict(namespace), sort_keys=True, separators=(",", ":")).encode()
    ns_digest = hashlib.blake2b(b"kvtier-chunk-v1" + canonical, digest_size=32).digest()
    seed = hashlib.blake2b(ns_digest, digest_size=32)
    seed.update((4).to_bytes(8, "little") + b"salt")
    prev = seed.digest()
    tokens = list(range(64 * 2))
    expected = []
    for i in range(2):
        chunk = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[i * 64 : (i + 1) * 64])
        prev = hashlib.blake2b(prev + chunk, digest_size=32).digest()
        expected.append(prev)
    assert namespace.chunk_keys(tokens, "salt") == expected


def test_tail_keys_match_the_documented_formula(namespace):
    """Tail of L tokens after whole chunks ending in h_last: BLAKE2b-256(h_last || int64-LE tail),
    personalized ``kvtier-tail``; one key per multiple of the granule (16 here, page size 16)."""
    tokens = list(range(64 * 2 + 40))
    keys = namespace.chunk_keys(tokens)
    tail = b"".join(t.to_bytes(8, "little", signed=True) for t in tokens[128:])
    expected = [hashlib.blake2b(keys[-1] + tail[: 8 * n], digest_size=32, person=b"kvtier-tail").digest()
                for n in (16, 32)]
    assert namespace.tail_keys(tokens, keys) == expected
    assert not set(expected) & set(namespace.chunk_keys(tokens[128:] + [0] * 24))


def test_a_tail_is_named_by_its_whole_prefix_and_only_its_own_tokens(namespace):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 128_000, 64 * 3 + 50).tolist()
    ka = namespace.chunk_keys(a)
    ta = namespace.tail_keys(a, ka)
    assert len(ta) == 3  # 16, 32, 48 of the 50 tail tokens
    # A shorter continuation, or the tail cut at another length, names the same leading tails.
    assert namespace.tail_keys(a[:64 * 3 + 33], ka) == ta[:2]
    # The same tail tokens after a different prefix, or under another tenant, are another tail.
    b = [a[0] + 1] + a[1:]
    assert set(namespace.tail_keys(b, namespace.chunk_keys(b))).isdisjoint(ta)
    assert set(namespace.tail_keys(a, namespace.chunk_keys(a, "salt"), "salt")).isdisjoint(ta)
    # A sequence shorter than a chunk has a tail too, seeded like its first chunk.
    short = namespace.tail_keys(a[:20], [])
    assert len(short) == 1 and short != namespace.tail_keys(a[:20], [], "salt")


@pytest.mark.parametrize("page_size, lengths", [(1, [16, 32, 48]), (32, [32]), (64, [])])
def test_tail_lengths_are_whole_pages(namespace, page_size, lengths):
    ns = dataclasses.replace(namespace, page_size=page_size)
    tokens = list(range(64 + 63))
    tails = ns.tail_keys(tokens, ns.chunk_keys(tokens))
    assert [ns.tail_granule * (j + 1) for j in range(len(tails))] == lengths
