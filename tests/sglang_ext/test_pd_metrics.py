"""kvtier's PD metrics: served where a benchmark reads them, and moved by exactly the KV a request moves.

The HTTP side runs in this process (a tier store's page that the PD counters join, a page of
their own, a port taken by someone else). The counters are checked between two real processes
(``pd_peer.py``: real SGLang 0.5.17 bootstrap server, pools and ``KvtierKVManager``, as in
``test_pd_conn.py``), each with its own ``KVTIER_METRICS_PORT``, scraped over HTTP.
"""

from __future__ import annotations

import importlib.util
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.sglang_ext.metrics import TierMetrics, pd_metrics_on

_spec = importlib.util.spec_from_file_location("kvtier_test_pd_conn_for_metrics",
                                               Path(__file__).with_name("test_pd_conn.py"))
pd_conn_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pd_conn_test)
Process, bootstrap, new_room, peer_env = pd_conn_test.Process, pd_conn_test.bootstrap, pd_conn_test.new_room, pd_conn_test.peer_env
free_port = pd_conn_test.free_port
WAITING, SUCCESS, FAILED = pd_conn_test.WAITING, pd_conn_test.SUCCESS, pd_conn_test.FAILED

PAGE_BYTES = 512  # pd_peer's default pool: 4 tokens x 2 layers x K,V x 2 heads x 8 dims x bf16


def scrape(port: int) -> dict[str, float]:
    """Every sample on ``/metrics`` as ``{'name{k=v,...}': value}``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_pd_metrics_join_the_store_page_or_serve_their_own():
    store_port, own_port = free_port(), free_port()
    store = TierMetrics()
    http = store.serve(store_port)
    try:
        pd = pd_metrics_on(store_port)
        assert pd.registry is store.registry and pd_metrics_on(store_port) is pd
        pd.bytes.labels("prefill").inc(4096)
        store.hits.labels("cpu").inc(3)
        page = scrape(store_port)
        assert page["kvtier_pd_bytes_total{role=prefill}"] == 4096 and page["kvtier_hits_total{tier=cpu}"] == 3

        alone = pd_metrics_on(own_port)
        assert alone.registry is not store.registry
        alone.requests.labels("decode", "success").inc()
        alone.transfer.labels("decode").observe(0.25)
        page = scrape(own_port)
        assert page["kvtier_pd_requests_total{outcome=success,role=decode}"] == 1
        assert page["kvtier_pd_transfer_seconds_count{role=decode}"] == 1
        assert page["kvtier_pd_transfer_seconds_sum{role=decode}"] == 0.25
        assert "kvtier_hits_total{tier=cpu}" not in page
        health = urllib.request.urlopen(f"http://127.0.0.1:{own_port}/health", timeout=5)
        assert health.status == 200 and b'"ok"' in health.read()
    finally:
        http.shutdown()
        http.server_close()
    # The store's page is gone: PD counters asked for again on its port get a page of their own.
    again = pd_metrics_on(store_port)
    assert again.registry is not store.registry
    again.bytes.labels("decode").inc(512)
    page = scrape(store_port)
    assert page["kvtier_pd_bytes_total{role=decode}"] == 512 and "kvtier_hits_total{tier=cpu}" not in page


def test_a_port_taken_by_another_process_is_an_error():
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        with pytest.raises(OSError):
            pd_metrics_on(taken.getsockname()[1])


def wait_for(port: int, key: str, at_least: float, timeout_s: float = 10) -> dict[str, float]:
    """Scrape until ``key`` reaches ``at_least`` (the prefill times a request at its last ack)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = scrape(port)
        if page.get(key, 0.0) >= at_least or time.monotonic() > deadline:
            return page
        time.sleep(0.05)


def delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_move_by_the_exact_kv_a_request_moves_and_count_failures():
    ports = {"prefill": free_port(), "decode": free_port()}
    base = peer_env()
    base.update(pd_conn_test.ENV)
    procs = {role: Process({**base, "KVTIER_METRICS_PORT": str(port)}) for role, port in ports.items()}
    try:
        for p in procs.values():
            assert p.reply() == {"ready": True}
        bootstrap_port = free_port()
        addr = f"127.0.0.1:{bootstrap_port}"
        prefill = procs["prefill"].rank("p", role="prefill", bootstrap_port=bootstrap_port, seed=1)
        decode = procs["decode"].rank("d", role="decode", bootstrap_port=0, seed=2)
        rng = np.random.default_rng(5)
        for n_pages, prefix_pages in ((9, 1), (3, 0), (12, 4)):
            before = {role: scrape(port) for role, port in ports.items()}
            room = new_room(rng)
            src = rng.choice(np.arange(1, 64), n_pages, replace=False).tolist()
            dst = rng.choice(np.arange(1, 64), n_pages, replace=False).tolist()
            assert bootstrap(prefill, decode, addr, room, dst[prefix_pages:], prefix_pages * 4) == WAITING
            assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
            prefill.call("init", room=room, prompt_len=n_pages * 4, aux_index=1, first_token=7)
            prefill.call("send", room=room, pages=src[prefix_pages:], last=True, tokens=(n_pages - prefix_pages) * 4)
            assert prefill.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
            assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
            assert decode.call("digests", pages=dst[prefix_pages:]) == prefill.call("digests", pages=src[prefix_pages:])
            moved = n_pages - prefix_pages
            for role, port in ports.items():
                after = wait_for(port, f"kvtier_pd_transfer_seconds_count{{role={role}}}",
                                 before[role].get(f"kvtier_pd_transfer_seconds_count{{role={role}}}", 0) + 1)
                assert delta(before[role], after, f"kvtier_pd_bytes_total{{role={role}}}") == moved * PAGE_BYTES
                assert delta(before[role], after, f"kvtier_pd_pages_total{{role={role}}}") == moved
                assert delta(before[role], after, f"kvtier_pd_requests_total{{outcome=success,role={role}}}") == 1
                assert delta(before[role], after, f"kvtier_pd_requests_total{{outcome=failed,role={role}}}") == 0
                assert delta(before[role], after, f"kvtier_pd_transfer_seconds_count{{role={role}}}") == 1
                assert 0 < delta(before[role], after, f"kvtier_pd_transfer_seconds_sum{{role={role}}}") < 10
                busy = delta(before[role], after, f"kvtier_pd_busy_seconds_total{{role={role}}}")
                # CPU pools: the wall time of the torch copies (gather, scatter), inside the busy time
                copy = delta(before[role], after, f"kvtier_pd_copy_seconds_total{{path=staged,role={role}}}")
                assert 0 < copy < busy
            prefill.call("clear", room=room)
            decode.call("clear", room=room)
        stats = {"prefill": prefill.call("stats"), "decode": decode.call("stats")}
        for role, port in ports.items():  # the Prometheus counters are the manager's own totals
            page = scrape(port)
            assert page[f"kvtier_pd_bytes_total{{role={role}}}"] == stats[role]["bytes"] == (8 + 3 + 8) * PAGE_BYTES
            assert page[f"kvtier_pd_pages_total{{role={role}}}"] == stats[role]["pages"]
            # zmq has no direct path: every byte went through staging, and the prefill says so per peer
            assert page[f"kvtier_pd_path_bytes_total{{path=staged,role={role}}}"] == stats[role]["bytes"]
            assert f"kvtier_pd_path_bytes_total{{path=direct,role={role}}}" not in page
            assert page[f"kvtier_pd_copy_seconds_total{{path=staged,role={role}}}"] == pytest.approx(
                stats[role]["copy_seconds"]["staged"]) and list(stats[role]["copy_seconds"]) == ["staged"]
        assert scrape(ports["prefill"])["kvtier_pd_peers_total{path=staged,role=prefill}"] == 1

        # A decode rank of another page size, in the same process: it shares that process's counters.
        before = {role: scrape(port) for role, port in ports.items()}
        mismatched = procs["decode"].rank("d8", role="decode", bootstrap_port=0, seed=3, page_size=8)
        room = new_room(rng)
        bootstrap(prefill, mismatched, addr, room, [1, 2], prefix_len=0)
        assert mismatched.call("wait", room=room, want=[], timeout_s=10)["status"] == FAILED
        assert prefill.call("wait", room=room, want=[], timeout_s=10)["status"] == FAILED
        for role, port in ports.items():
            after = scrape(port)
            assert delta(before[role], after, f"kvtier_pd_requests_total{{outcome=failed,role={role}}}") == 1
            assert delta(before[role], after, f"kvtier_pd_bytes_total{{role={role}}}") == 0
    finally:
        for p in procs.values():
            p.kill()


def test_a_decode_whose_metrics_port_is_taken_warns_and_still_serves(capfd):
    """launch.cluster gives both workers one config: a decode on the prefill's metrics port must
    not fail to start; it logs which setting to change and moves KV without counters."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        base = peer_env()
        base.update(pd_conn_test.ENV)
        port = taken.getsockname()[1]
        env = {**base, "KVTIER_METRICS_PORT": str(port)}
        procs = [Process(env), Process(env)]
        try:
            for p in procs:
                assert p.reply() == {"ready": True}
            bootstrap_port = free_port()
            prefill = procs[0].rank("p", role="prefill", bootstrap_port=bootstrap_port, seed=1)
            decode = procs[1].rank("d", role="decode", bootstrap_port=0, seed=2)
            room = new_room(np.random.default_rng(8))
            assert bootstrap(prefill, decode, f"127.0.0.1:{bootstrap_port}", room, [5, 6, 7], 0) == WAITING
            assert prefill.call("wait", room=room, want=[WAITING], timeout_s=10)["status"] == WAITING
            prefill.call("init", room=room, prompt_len=12, aux_index=1, first_token=7)
            prefill.call("send", room=room, pages=[9, 10, 11], last=True, tokens=12)
            assert decode.call("wait", room=room, want=[SUCCESS], timeout_s=20)["status"] == SUCCESS
            assert decode.call("digests", pages=[5, 6, 7]) == prefill.call("digests", pages=[9, 10, 11])
            assert decode.call("stats")["bytes"] == 3 * PAGE_BYTES
        finally:
            for p in procs:
                p.kill()
    # The peers' stderr is this process's file descriptor 2, which capfd holds: one warning per rank.
    err = capfd.readouterr().err
    warning = f"kvtier PD: no PD metrics: cannot serve them on port {port} "
    assert err.count(warning) == 2, err[-3000:]
    assert "give this server another metrics_port (KVTIER_METRICS_PORT)" in err
