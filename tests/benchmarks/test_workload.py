"""The workload generators: deterministic by seed, reuse exactly where the workload says, nowhere else."""

from __future__ import annotations

import pytest
from bench_common import LLAMA3_8B, BenchError
from long_doc import chat_passes, noreuse_passes, rag_passes, token_range

IDS = token_range(LLAMA3_8B)
BOS = [LLAMA3_8B["bos_token_id"]]


def test_rag_is_deterministic_by_seed():
    assert rag_passes(5, 300, 7, IDS, BOS) == rag_passes(5, 300, 7, IDS, BOS)
    assert rag_passes(5, 300, 7, IDS, BOS) != rag_passes(5, 300, 8, IDS, BOS)


@pytest.mark.parametrize("docs,doc_len,seed", [(2, 64, 0), (7, 500, 1), (46, 200, 3)])
def test_rag_warm_pass_reuses_every_document_in_another_order(docs, doc_len, seed):
    (cold_name, cold), (warm_name, warm) = rag_passes(docs, doc_len, seed, IDS, BOS)
    assert (cold_name, warm_name) == ("cold", "warm")
    doc = lambda p: tuple(p[1 : 1 + doc_len])  # noqa: E731
    assert all(p[0] == BOS[0] for p in cold + warm)
    assert len({doc(p) for p in cold}) == docs
    assert sorted(map(doc, cold)) == sorted(map(doc, warm))
    assert list(map(doc, cold)) != list(map(doc, warm))
    questions = [tuple(p[1 + doc_len :]) for p in cold + warm]
    assert all(20 <= len(q) <= 50 for q in questions)
    assert len(set(questions)) == 2 * docs
    assert all(IDS[0] <= t < IDS[1] for p in cold + warm for t in p[1:])


def test_more_warm_passes_add_orders_of_their_own_and_keep_the_first_passes():
    docs, doc_len = 9, 40
    one, three = rag_passes(docs, doc_len, 5, IDS, BOS), rag_passes(docs, doc_len, 5, IDS, BOS, warm_passes=3)
    assert three[:2] == one and [name for name, _ in three] == ["cold", "warm", "warm2", "warm3"]
    doc = lambda p: tuple(p[1 : 1 + doc_len])  # noqa: E731
    orders = [list(map(doc, prompts)) for _, prompts in three]
    assert all(sorted(o) == sorted(orders[0]) and o != orders[0] for o in orders[1:])
    assert orders[2] != orders[1] and orders[3] != orders[2]
    questions = [tuple(p[1 + doc_len :]) for _, prompts in three for p in prompts]
    assert len(set(questions)) == 4 * docs
    with pytest.raises(BenchError, match="--warm-passes"):
        rag_passes(docs, doc_len, 5, IDS, BOS, warm_passes=0)


def test_chat_turn_extends_the_previous_turn_exactly():
    users, turns, first, turn_len, reply = 5, 4, 300, 40, 10
    passes = chat_passes(users, turns, first, turn_len, reply, 3, IDS, BOS)
    assert [name for name, _ in passes] == ["turn1", "turn2", "turn3", "turn4"]
    for (_, before), (_, after) in zip(passes, passes[1:]):
        for prev, cur in zip(before, after):
            assert cur[: len(prev)] == prev
            assert len(cur) == len(prev) + reply + turn_len
    first_turns = passes[0][1]
    assert all(len(p) == 1 + first for p in first_turns)
    assert len({tuple(p[1:]) for p in first_turns}) == users
    assert chat_passes(users, turns, first, turn_len, reply, 3, IDS, BOS) == passes


def test_noreuse_prompts_share_nothing_beyond_bos():
    passes = noreuse_passes(30, 200, 0, IDS, BOS)
    assert [name for name, _ in passes] == ["pass1", "pass2"]
    prompts = passes[0][1] + passes[1][1]
    assert len(prompts) == 60 and all(p[0] == BOS[0] and len(p) == 201 for p in prompts)
    assert len({p[1] for p in prompts}) == 60
    assert noreuse_passes(30, 200, 0, IDS, BOS) == passes


def test_bad_sizes_name_the_option():
    with pytest.raises(BenchError, match="--docs"):
        rag_passes(1, 100, 0, IDS, BOS)
    with pytest.raises(BenchError, match="--turns"):
        chat_passes(2, 1, 100, 10, 10, 0, IDS, BOS)
    with pytest.raises(BenchError, match="vocab_size"):
        token_range({"vocab_size": 1500})
