"""Serving targets of `bnpipe serve`, each a ratio against a baseline measured in the same run.

Servers, each started on 127.0.0.1 and stopped by its pid:
  (a) bnpipe serve (dynamic batching, max batch 256, 500 us delay);
  (b) bnpipe serve --max-batch-size 1;
  (c) NVIDIA Triton Inference Server from the pip package nvidia-pytriton, serving the same ONNX
      file through an onnxruntime session in its bound Python callable, dynamic batching on (max
      batch 256, 500 us delay). PyTriton pins numpy<2, so it runs from a venv of its own;
  (d) the HTTP stack's ceiling: a bare Starlette app on uvicorn (uvloop, httptools), defined
      in benchmarks/serve_peers.py with (c), that parses the V2 request and answers fixed bytes
      without running a model.
Load: benchmarks/serve_load.py processes of Python threads calling tritonclient.http `infer`
synchronously on one [1, 1, 28, 28] image, binary both ways (1 process at concurrency 1, else 2:
one tritonclient process saturates near 3,300 requests/s). Rounds alternate the servers. The
table gives the median over rounds of throughput and CPU time, and p50/p99 of all the rounds'
latencies pooled (one 2 s window's p99 rests on a handful of stalls; the pool's on all of them).
Server CPU time per request is its process tree's user+system time over the requests completed
in the measured window.

Targets at concurrency 64: throughput >= 1.3x Triton's with p99 no worse; >= 0.85x the ceiling;
batching never slower than --max-batch-size 1 (on a GPU, 2x faster at c64); server CPU time per request <= 0.5x
Triton's. Batching against --max-batch-size 1 is compared round by round (both servers of a
round run minutes apart at most); on the CPU it counts as slower only when it was slower in every
round: at c1 the two run the same code, and at c64 both wait on the generator, so their medians
differ by the noise alone, either way. Time to ready (launch to GET /v2/health/ready 200) <= 2x the cold start of
`bnpipe predict one.png`.

Each server runs in a session of its own, as one started from another shell would. Linux's
autogroup scheduling then splits the cores between the server and the load generators, as two
programs; --same-session puts the servers in the generators' scheduling group instead, where all
their threads share the cores (the p99 of a server faster than its generator changes most).

Usage: python benchmarks/serve.py [--model models/bn_convnet.onnx] [--data ../shared/data]
       [--triton-python .venv-pytriton/bin/python] [--duration 2] [--rounds 5] [--generators 2]
       [--same-session]
Setup for (c): python3 -m venv .venv-pytriton && .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime-gpu
Exits 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from serve_procs import Server, cpu_seconds, free_port  # beside this script

from bnpipe.serve.runtime import PARALLEL_ROWS, intra_op_threads

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# The console script beside this Python; where there is none (a GPU machine's assembled package), -m.
BNPIPE = [str(BIN / "bnpipe")] if (BIN / "bnpipe").exists() else [sys.executable, "-m", "bnpipe"]
CONCURRENCY = (1, 8, 64)
THROUGHPUT_VS_TRITON, VS_CEILING, CPU_VS_TRITON, READY_VS_PREDICT = 1.3, 0.85, 0.5, 2.0

def load(server: Server, concurrency: int, duration: float, warmup: float, generators: int = 2) -> dict[str, Any]:
    """Run the load generator at ``concurrency``; return throughput, p50, p99, CPU per request and the latencies."""
    processes = min(concurrency, generators)
    start = time.time() + 1.0  # the generators import tritonclient first
    measure_from, end = start + warmup, start + warmup + duration
    gens = [subprocess.Popen([sys.executable, str(HERE / "serve_load.py"), f"127.0.0.1:{server.port}", "bnpipe",
                              str(concurrency // processes + (i < concurrency % processes)), str(start),
                              str(measure_from), str(end)], stdout=subprocess.PIPE, text=True)
            for i in range(processes)]
    time.sleep(max(0.0, measure_from - time.time()))
    cpu0 = cpu_seconds(server.proc.pid)
    time.sleep(max(0.0, end - time.time()))
    cpu1 = cpu_seconds(server.proc.pid)
    latencies: list[float] = []
    errors = 0
    try:
        for gen in gens:
            out, _ = gen.communicate(timeout=60)
            result = json.loads(out)
            latencies += result["latencies"]
            errors += result["error_count"]
            if result["errors"]:
                print(f"  {server.name} c{concurrency}: errors {result['errors']}", file=sys.stderr)
    finally:  # a generator that failed or hung is not left behind
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
                gen.wait(10)
    n = len(latencies)
    return {"rps": n / duration, **percentiles(latencies), "cpu_us": (cpu1 - cpu0) / n * 1e6 if n else float("nan"),
            "errors": errors, "latencies": latencies}


def percentiles(latencies: list[float]) -> dict[str, float]:
    """p50 and p99 in milliseconds of latencies in seconds."""
    ordered, n = sorted(latencies), len(latencies)
    return {"p50": ordered[n // 2] * 1e3 if n else float("nan"),
            "p99": ordered[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan")}


def time_to_ready(model: str, device: str, one_png: Path, repeats: int) -> tuple[float, float]:
    """Medians of: launch of `bnpipe serve` to ready 200, and `bnpipe predict one.png`, interleaved."""
    serve_times, predict_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        done = subprocess.run([*BNPIPE, "predict", "--model", model, "--device", device, str(one_png)],
                              capture_output=True)
        predict_times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            sys.exit(f"bnpipe predict failed: {done.stderr.decode()[-500:]}")
        port = free_port()
        cmd = [*BNPIPE, "serve", "--model", model, "--device", device, "--port", str(port)]
        t0 = time.perf_counter()
        with Server("bnpipe serve", cmd, port, same_session=True, ready_path="/v2/health/ready"):
            serve_times.append(time.perf_counter() - t0)
    return statistics.median(serve_times), statistics.median(predict_times)


def servers(args: argparse.Namespace) -> dict[str, tuple[list[str], dict[str, str] | None, int]]:
    """name -> (command, environment, ports it needs)."""
    bnpipe = [*BNPIPE, "serve", "--model", args.model, "--device", args.device]
    libdir = sysconfig.get_config_var("LIBDIR")  # PyTriton's stub loads the running Python's libpython
    env = {**os.environ, "LD_LIBRARY_PATH": f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    peers = str(HERE / "serve_peers.py")
    found = {"bnpipe serve": (bnpipe, None, 1),
             "bnpipe serve --max-batch-size 1": (bnpipe + ["--max-batch-size", "1"], None, 1),
             "bare Starlette ceiling": ([sys.executable, peers, "bare"], None, 1)}
    if Path(args.triton_python).exists():
        found["Triton (PyTriton)"] = ([args.triton_python, peers, "triton", args.model], env, 3)
    else:
        print(f"no {args.triton_python}: Triton is not measured (see the setup line in this script's docstring)")
    return {k: v for k, v in found.items() if not args.only or any(o in k for o in args.only)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="models/bn_convnet.onnx")
    parser.add_argument("--data", default=os.environ.get("BNPIPE_DATA", "../shared/data"))
    parser.add_argument("--device", default="cpu", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--triton-python", default=".venv-pytriton/bin/python")
    parser.add_argument("--duration", type=float, default=2.0, help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all servers (see the docstring)")
    parser.add_argument("--ready-repeats", type=int, default=5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--generators", type=int, default=2, help="load-generator processes (fewer at lower concurrency)")
    parser.add_argument("--same-session", action="store_true",
                        help="servers in this session's scheduling group, not a session of their own")
    parser.add_argument("--only", nargs="+", help="measure only the servers whose names contain one of these")
    parser.add_argument("--no-ready", action="store_true", help="skip the time-to-ready measurement")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, load average "
          f"{os.getloadavg()[0]:.2f}; model {args.model}, --device {args.device}")
    table: dict[tuple[str, int], list[dict[str, Any]]] = {}
    plan = servers(args)
    for rnd in range(args.rounds):
        order = list(plan) if rnd % 2 == 0 else list(reversed(plan))
        for name in order:
            cmd, env, span = plan[name]
            port = free_port(span)
            if name.startswith("Triton"):
                cmd = cmd + [str(port), str(intra_op_threads()), args.device, str(PARALLEL_ROWS)]
            elif name.startswith("bare"):
                cmd = cmd + [str(port)]
            else:
                cmd = cmd + ["--port", str(port)]
            with Server(name, cmd, port, env, args.same_session) as server:
                load(server, 8, 0.5, 0.2)  # warm: connections, caches, the batcher's first batches
                for c in args.concurrency:
                    table.setdefault((name, c), []).append(load(server, c, args.duration, args.warmup,
                                                                args.generators))
    med = {key: {**{k: statistics.median(r[k] for r in runs) for k in ("rps", "cpu_us", "errors")},
                  **percentiles([x for r in runs for x in r["latencies"]])} for key, runs in table.items()}
    print(f"\n{'server':34} {'conc':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/req':>10} {'errors':>6}")
    for (name, c), m in med.items():
        print(f"{name:34} {c:>4} {m['rps']:>8,.0f} {m['p50']:>7.2f} {m['p99']:>7.2f} {m['cpu_us']:>10.0f} "
              f"{m['errors']:>6.0f}")
    missed = []

    def check(label: str, value: float, target: float, higher: bool) -> None:
        good = value >= target if higher else value <= target
        print(f"{label}: {value:.2f}x (target {'>=' if higher else '<='} {target}x) {'ok' if good else 'MISSED'}")
        if not good:
            missed.append(label)

    top = max(args.concurrency)
    ours = med.get(("bnpipe serve", top))
    if ours and ("Triton (PyTriton)", top) in med:
        triton = med[("Triton (PyTriton)", top)]
        check(f"throughput vs Triton at c{top}", ours["rps"] / triton["rps"], THROUGHPUT_VS_TRITON, True)
        rounds = sorted(b["p99"] / t["p99"] for b, t in zip(table[("bnpipe serve", top)], table[("Triton (PyTriton)", top)]))
        check(f"p99 vs Triton at c{top}, pooled (rounds {rounds[0]:.2f}-{rounds[-1]:.2f}x)", ours["p99"] / triton["p99"],
              1.0, False)
        check(f"CPU time per request vs Triton at c{top}", ours["cpu_us"] / triton["cpu_us"], CPU_VS_TRITON, False)
    if ours and ("bare Starlette ceiling", top) in med:
        check(f"throughput vs the bare-stack ceiling at c{top}",
              ours["rps"] / med[("bare Starlette ceiling", top)]["rps"], VS_CEILING, True)
    for c in args.concurrency:
        one = table.get(("bnpipe serve --max-batch-size 1", c))
        if one is None or ("bnpipe serve", c) not in table:
            continue
        ratios = sorted(b["rps"] / o["rps"] for b, o in zip(table[("bnpipe serve", c)], one))
        label = f"throughput batching vs --max-batch-size 1 at c{c} (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x)"
        if args.device != "cpu":  # 2x at the top concurrency; a lone client has nothing to batch
            check(label, statistics.median(ratios), 2.0 if c == top else 1.0, True)
            continue
        # On the CPU: slower only if slower in every round (see the docstring).
        good = ratios[-1] >= 1.0
        print(f"{label}: {statistics.median(ratios):.2f}x median (target: not slower in every round) "
              f"{'ok' if good else 'MISSED'}")
        if not good:
            missed.append(label)
    if args.no_ready:
        print("all targets met" if not missed else f"MISSED: {', '.join(missed)}")
        return 1 if missed else 0
    from bnpipe.serve.samples import read_idx

    with tempfile.TemporaryDirectory(prefix="bnpipe-bench-") as tmp:
        from PIL import Image

        one_png = Path(tmp) / "one.png"
        Image.fromarray(read_idx(Path(args.data) / "MNIST" / "raw" / "t10k-images-idx3-ubyte")[0]).save(one_png)
        serve_s, predict_s = time_to_ready(args.model, args.device, one_png, args.ready_repeats)
    print(f"time to ready: bnpipe serve {serve_s:.3f} s, bnpipe predict one.png {predict_s:.3f} s "
          f"(medians of {args.ready_repeats})")
    check("time to ready vs predict cold start", serve_s / predict_s, READY_VS_PREDICT, False)
    print("all targets met" if not missed else f"MISSED: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
