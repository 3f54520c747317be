"""The measurements that need an engine or numpy, run as `python -m gateway.system.child WHAT`
in a short-lived process: the gateway never loads libllama or torch itself, and an engine
that crashes on this CPU (an instruction it lacks) takes only this process down.

Each prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

#: Rounds of each measurement; the best one is kept (the others met other work).
_READ_ROUNDS, _MATRIX_ROUNDS = 5, 3
_MATRIX = 1536


def bandwidth(threads: int, total_bytes: int) -> dict[str, Any]:
    """How fast `threads` threads read memory (a buffer past the caches, summed), and how many
    float32 multiply-adds per second a matrix product does on them."""
    import numpy as np

    share = max(1 << 20, total_bytes // threads) // 8
    buffers = [np.ones(share, dtype=np.int64) for _ in range(threads)]  # touched: no page faults
    best = float("inf")
    for _ in range(_READ_ROUNDS):
        ready = threading.Barrier(threads)
        spans: list[tuple[float, float]] = []

        def read(buffer: Any, ready: threading.Barrier = ready, spans: list = spans) -> None:
            ready.wait()
            started = time.perf_counter()
            buffer.sum()  # numpy lets go of the GIL: the threads read at once
            spans.append((started, time.perf_counter()))

        workers = [threading.Thread(target=read, args=(b,)) for b in buffers]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        # From the first thread's start to the last one's end, as each thread timed itself (a
        # clock read by this thread could start late, if it was kept waiting for a core).
        best = min(best, max(end for _, end in spans) - min(start for start, _ in spans))
    read_rate = share * 8 * threads / best
    del buffers
    matrix = np.random.default_rng(0).random((_MATRIX, _MATRIX), dtype=np.float32)
    matrix @ matrix  # BLAS starts its threads
    fastest = float("inf")
    for _ in range(_MATRIX_ROUNDS):
        started = time.perf_counter()
        matrix @ matrix
        fastest = min(fastest, time.perf_counter() - started)
    return {
        "read_bytes_per_second": read_rate,
        "flops_per_second": 2 * _MATRIX**3 / fastest,
        "threads": threads,
        "buffer_bytes": share * 8 * threads,
    }


def llama_cpp() -> dict[str, Any]:
    import llama_cpp as engine

    info = engine.llama_print_system_info()
    return {
        "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info),
        "gpu_offload": bool(engine.llama_supports_gpu_offload()),
    }


def torch() -> dict[str, Any]:
    import torch as engine

    cuda = bool(engine.cuda.is_available())
    mps = getattr(engine.backends, "mps", None)
    return {
        "cpu_capability": engine.backends.cpu.get_cpu_capability(),
        "cuda_build": engine.version.cuda,
        "cuda": cuda,
        "cuda_devices": [engine.cuda.get_device_name(i) for i in range(engine.cuda.device_count())]
        if cuda
        else [],
        "mps": bool(mps is not None and mps.is_available()),
    }


def ctranslate2() -> dict[str, Any]:
    import ctranslate2 as engine

    cuda_devices = engine.get_cuda_device_count()
    return {
        "cpu_compute_types": sorted(engine.get_supported_compute_types("cpu")),
        "cuda_devices": cuda_devices,
        "cuda_compute_types": sorted(engine.get_supported_compute_types("cuda"))
        if cuda_devices
        else [],
    }


def onnxruntime() -> dict[str, Any]:
    import onnxruntime as engine

    return {"providers": list(engine.get_available_providers()), "device": engine.get_device()}


PROBES = {
    "llama_cpp": llama_cpp,
    "torch": torch,
    "ctranslate2": ctranslate2,
    "onnxruntime": onnxruntime,
}


def main(argv: list[str]) -> int:
    what = argv[0] if argv else ""
    if what == "bandwidth" and len(argv) == 3:
        result = bandwidth(int(argv[1]), int(argv[2]))
    elif what in PROBES:
        result = PROBES[what]()
    else:
        print(f"usage: python -m gateway.system.child bandwidth THREADS BYTES | {'|'.join(PROBES)}")
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
