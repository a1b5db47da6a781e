"""What handing a step to a tensor-parallel worker costs rank 0: a Ray actor call per worker (what
raylm did) against a write to the worker's socket (replicas.parallel.step_channel, what it does).

A decode step's StepMessage (as rank 0's input builder makes it for `--batch` sequences) goes to
one worker actor `--messages` times each way; the worker only counts what it receives. Printed
and written to bench/results/tp-step-send-b<batch>-<cpu>.json: rank 0's time per message (the engine
thread's cost, between the GPU's steps) and the time until the worker has them all.

    python bench/tp_step_send.py [--batch 1] [--messages 2000]
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, slug  # noqa: E402
from replicas.parallel.messages import StepMessage  # noqa: E402
from replicas.parallel.step_channel import StepReceiver, StepSender  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def decode_step(batch: int) -> StepMessage:
    """A decode step of `batch` sequences: their regions filled, one block-table update."""
    regions = np.arange(8 * batch + 1, dtype=np.int64)
    return StepMessage((batch, batch, batch, 0, 1, 600), regions, np.array([0, 37, 1, 1234], dtype=np.int64),
                       batch, [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--messages", type=int, default=2000)
    args = ap.parse_args()
    import ray

    @ray.remote
    class Worker:
        def __init__(self):
            self.count = 0
            self.done = threading.Event()

        def step(self, msg) -> None:  # the Ray call path
            self.count += 1

        def received(self) -> int:
            return self.count

        def listen(self, address, expected: int) -> None:  # the socket path, on a thread
            receiver = StepReceiver(address, 1, 60)

            def serve():
                for _ in range(expected):
                    receiver.receive()
                self.done.set()

            threading.Thread(target=serve, daemon=True).start()

        def wait_done(self) -> bool:
            return self.done.wait(120)

    tmp = tempfile.mkdtemp(prefix="raylm-bench-")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp,
             object_store_memory=100 * 1024**2)
    msg, n = decode_step(args.batch), args.messages
    worker = Worker.remote()
    for _ in range(200):  # warm: the actor's first calls set up its connections
        worker.step.remote(msg)
    ray.get(worker.received.remote())
    start = time.perf_counter()
    for _ in range(n):
        worker.step.remote(msg)
    ray_send = time.perf_counter() - start
    assert ray.get(worker.received.remote()) == 200 + n
    ray_total = time.perf_counter() - start

    sender = StepSender(ray.util.get_node_ip_address(), secrets.token_bytes(16))
    ready = worker.listen.remote(sender.address, 200 + n)
    sender.accept(1, 60)
    ray.get(ready)
    for _ in range(200):
        sender.send(msg)
    start = time.perf_counter()
    for _ in range(n):
        sender.send(msg)
    socket_send = time.perf_counter() - start
    assert ray.get(worker.wait_done.remote())
    socket_total = time.perf_counter() - start
    sender.close()
    ray.shutdown()

    info = machine()
    result = {"bench": "tp_step_send", "machine": info, "batch": args.batch, "messages": n,
              "ray_call_us_per_message": ray_send / n * 1e6, "ray_call_delivered_us_per_message": ray_total / n * 1e6,
              "socket_us_per_message": socket_send / n * 1e6,
              "socket_delivered_us_per_message": socket_total / n * 1e6}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"tp-step-send-b{args.batch}-{slug(info['cpu'])}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"step message (batch {args.batch}) to one worker, {n} messages, {info['cpu']}:")
    print(f"  Ray actor call: rank 0 {result['ray_call_us_per_message']:7.1f} us/message, "
          f"all delivered after {result['ray_call_delivered_us_per_message']:7.1f} us/message")
    print(f"  socket write:   rank 0 {result['socket_us_per_message']:7.1f} us/message, "
          f"all delivered after {result['socket_delivered_us_per_message']:7.1f} us/message")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
