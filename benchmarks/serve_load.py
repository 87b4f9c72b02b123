"""One load-generator process for benchmarks/serve.py (run by it, not by hand).

``python serve_load.py URL MODEL THREADS START MEASURE_FROM END``: THREADS Python threads, each
with its own `tritonclient.http.InferenceServerClient`, call `infer` synchronously on one
[1, 1, 28, 28] uint8 image, binary data both ways, from time START until END (time.time()). It
prints one JSON line: the requests that completed between MEASURE_FROM and END, their latencies
in seconds, and the errors. Bounded in time: every thread stops at END; a request's network
timeout is 10 s.

Before the threads start, the imported modules are frozen out of the garbage collector (`gc.freeze`).
Otherwise a full collection walks them every few thousand requests, pausing all of this process's
threads (measured 15 to 140 ms): a pause of the generator's own, charged to the server, and more
often the faster the server (with Triton none fell in a 2 s window, with bnpipe serve two).
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

import numpy as np
import tritonclient.http as httpclient


def worker(url: str, model: str, start: float, measure_from: float, end: float, seed: int,
           out: list[float], errors: list[str]) -> None:
    client = httpclient.InferenceServerClient(url, connection_timeout=10.0, network_timeout=10.0)
    image = np.random.default_rng(seed).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    inputs = [httpclient.InferInput("pixels", [1, 1, 28, 28], "UINT8")]
    inputs[0].set_data_from_numpy(image, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=True)]
    time.sleep(max(0.0, start - time.time()))
    while True:
        t0 = time.time()
        if t0 >= end:
            break
        try:
            result = client.infer(model, inputs, outputs=outputs)
            if result.as_numpy("logits").shape != (1, 10):
                errors.append("bad shape")
        except Exception as exc:  # noqa: BLE001 - count it and go on: the report shows them
            errors.append(str(exc)[:200])
            time.sleep(0.001)
            continue
        t1 = time.time()
        if t0 >= measure_from and t1 <= end:
            out.append(t1 - t0)
    client.close()


def main() -> None:
    url, model, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start, measure_from, end = (float(x) for x in sys.argv[4:7])
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    gc.collect()
    gc.freeze()
    pool = [threading.Thread(target=worker, args=(url, model, start, measure_from, end, i, latencies[i], errors))
            for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=max(1.0, end - time.time() + 15))
    flat = [x for per in latencies for x in per]
    print(json.dumps({"latencies": flat, "errors": errors[:5], "error_count": len(errors)}))


if __name__ == "__main__":
    main()
