"""What of the GPU-only benchmark scripts runs without a GPU: how their cases are put together."""

from __future__ import annotations

import transfer_gpu


def test_direct_packer_runs_each_mode_once_with_its_spin_and_switch_interval(monkeypatch):
    calls = []

    def fake_run(buffer_bytes, count, tokens, warmup, repeats, spin, switch_s):
        calls.append((spin, switch_s))
        return {"spin": spin, "switch": switch_s}

    monkeypatch.setattr(transfer_gpu, "packer_run", fake_run)
    case = transfer_gpu.direct_packer_case(64 * 10, 4, 10, 1, 2, None)
    assert calls == [(False, None), (True, None)]
    assert case["idle"] == {"spin": False, "switch": None} and case["busy_gil"]["spin"]
    assert case["row_bytes"] == 64 and case["buffers"] == 4 and "busy_gil_switch" not in case

    calls.clear()
    case = transfer_gpu.direct_packer_case(64 * 10, 4, 10, 1, 2, 0.0005)
    assert calls == [(False, None), (True, None), (True, 0.0005)]
    assert case["busy_gil_switch"] == {"spin": True, "switch": 0.0005}
