"""How much slower a small CPU tensor op runs right after its thread was away, by how it was away (GPU).

kvtier's hooks run on SGLang's scheduler thread right after it waited for a step's GPU results,
and each of their small torch ops was measured several times slower there than back to back
(``launch_cost.py``'s ``after_gpu_wait``). This tells the causes apart: a 40-element CPU
``torch.aminmax`` is timed (median of ``--repeats``) after the thread spent 0 / 1 / 10 / 40 ms
  * ``sync``: in ``torch.cuda.synchronize`` for a GPU kept busy that long (as SGLang's scheduler),
  * ``event_spin``: polling a CUDA event from Python for the same wait (both as ``launch_cost.py``
    waits),
  * ``cpu_sleep``: in ``time.sleep``, no GPU work,
  * ``cpu_busy``: in a Python busy loop, no GPU work,
each in a fresh process per CUDA schedule flag of the primary context (``auto``, ``spin``,
``yield``, ``blocking``; set through the driver API before torch creates the context). If the ops
are as slow after a sleep or a busy loop as after a GPU wait, whatever the flag, it is the time
away that costs (caches, the VM's vCPU), not the way the thread waits: only less work on that
thread helps.

    python benchmarks/cold_thread.py --out benchmarks/results/ab/cold_thread_h100.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import BENCHMARKS_DIR, add_commit_option, run_facts

FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}  # CU_CTX_SCHED_*
MODES = ("sync", "event_spin", "cpu_sleep", "cpu_busy")


def set_schedule_flag(flag: int) -> int:
    """Set the primary context's schedule flag of GPU 0 before it exists; the flags it then has."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise SystemExit(f"cold_thread.py needs an NVIDIA GPU and its driver: {e}") from None
    dev = ctypes.c_int()
    for name, call in (("cuInit", lambda: cuda.cuInit(0)),
                       ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(dev), 0)),
                       ("cuDevicePrimaryCtxSetFlags", lambda: cuda.cuDevicePrimaryCtxSetFlags_v2(dev, flag))):
        if (err := call()) != 0:
            raise SystemExit(f"{name} failed with CUDA error {err}")
    return dev.value


def measure(flag_name: str, repeats: int) -> dict:
    """One process's medians (us) per mode and time away; the schedule flag is set first."""
    dev = set_schedule_flag(FLAGS[flag_name])
    import torch  # after the flag: torch must not create the context before
    from launch_cost import spin_cycles_per_ms, wait_gpu

    device = torch.device("cuda")
    torch.zeros(1, device=device)
    flags, active = ctypes.c_uint(), ctypes.c_int()
    ctypes.CDLL("libcuda.so.1").cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
    small = torch.arange(40)

    def away(mode: str, ms: float) -> None:
        if mode in ("sync", "event_spin"):
            if ms:
                torch.cuda._sleep(int(ms * spin_cycles_per_ms(device)))
            wait_gpu(device, "synchronize" if mode == "sync" else "spin")
        elif mode == "cpu_sleep":
            time.sleep(ms / 1e3)
        else:
            until = time.perf_counter() + ms / 1e3
            while time.perf_counter() < until:
                pass

    out: dict = {"context_flags": flags.value, "torch_threads": torch.get_num_threads()}
    for mode in MODES:
        out[mode] = {}
        for ms in (0, 1, 10, 40):
            times = []
            for i in range(5 + repeats):
                away(mode, ms)
                t0 = time.perf_counter()
                torch.aminmax(small)
                if i >= 5:
                    times.append(time.perf_counter() - t0)
            out[mode][str(ms)] = round(statistics.median(times) * 1e6, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flags", default=",".join(FLAGS), help="CUDA schedule flags, comma-separated")
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure this flag, print JSON
    ap.add_argument("--out", default=str(BENCHMARKS_DIR / "results" / "ab" / "cold_thread.json"))
    add_commit_option(ap)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.repeats)))
        return
    by_flag = {}
    for name in args.flags.split(","):
        if name not in FLAGS:
            raise SystemExit(f"--flags: {name!r} is not one of {', '.join(FLAGS)}")
        child = subprocess.run([sys.executable, __file__, "--one", name, "--repeats", str(args.repeats)],
                               capture_output=True, text=True)
        if child.returncode:
            raise SystemExit(f"the {name} measurement failed (exit {child.returncode}):\n{child.stderr[-2000:]}")
        by_flag[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name}: " + ", ".join(f"{m} {by_flag[name][m]}" for m in MODES), flush=True)
    report = {"benchmark": "cold_thread", "op": "torch.aminmax of 40 int64 on the CPU, median us",
              "repeats": args.repeats, **run_facts(args.commit), "by_schedule_flag": by_flag}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
