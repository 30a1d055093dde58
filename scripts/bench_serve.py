"""Requests/s, p50/p99 latency and errors of `unified-vl serve`: dynamic batching vs --max-batch 1.

    python scripts/bench_serve.py                      # untrained uvl-tiny, CPU, 1/8/32 clients, mixed tasks
    python scripts/bench_serve.py --model runs/main/model --device cuda --requests 512 --out docs/bench/serve-gpu.md

Starts the real server (a subprocess, as users run it) once with ``--max-batch 16`` and once with
``--max-batch 1``; at each number of concurrent clients it sends ``/v1/predict`` requests that mix
four tasks (vqa, captioning, rec, classification with labels; a 640x480 JPEG each, base64 in JSON)
and counts requests/s, p50 and p99 latency and errors (any non-2xx answer). Prints a machine line
and a table with the ratios batching / no batching measured in the same run. Target: >= 3x
throughput at 32 clients with 0 errors. At 1 client both are about the same (a lone request waits
up to --max-wait-ms for company).

Without --model the model is an untrained preset (--preset), saved to a temporary folder; it
never writes end-of-sequence, so every open-ended request decodes exactly --max-new-tokens tokens,
a fixed workload. The server process gets --server-threads torch threads (OMP_NUM_THREADS): on a
small shared CPU, more threads than free cores make torch spin instead of compute.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

JSON = {"content-type": "application/json"}
# The mixed workload: one request of each task in turn (their decodings differ, so a batch splits into groups).
TASKS = (
    lambda i: {"task": "vqa", "question": f"what color is shape number {i}?"},
    lambda i: {"task": "captioning"},
    lambda i: {"task": "rec", "expression": f"the shape number {i}"},
    lambda i: {"task": "classification", "labels": ["circle", "square", "triangle", "cross"]},
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _untrained_model(preset: str, folder: Path) -> Path:
    import torch

    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer, model_vocab_size

    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    config = UnifiedVLConfig.from_preset(preset, text_config={"vocab_size": model_vocab_size(tokenizer)})
    model = build_model(config, tokenizer)
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    return save_pretrained(model, processor, folder / preset)


def _bodies(n: int, max_new_tokens: int) -> list[bytes]:
    """``n`` request bodies, serialised once: a 640x480 JPEG scene (tens of kB, like a photo) each."""
    rng = np.random.default_rng(0)
    bodies = []
    for i in range(n):
        image = Image.new("RGB", (640, 480), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = (int(v) for v in rng.integers(0, 560, 2))
            draw.ellipse((x, y % 400, x + 80, y % 400 + 80), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        body = {"image": base64.b64encode(buffer.getvalue()).decode(), **TASKS[i % len(TASKS)](i)}
        if body["task"] != "classification":
            body["max_new_tokens"] = max_new_tokens
        bodies.append(json.dumps(body).encode())
    return bodies


async def _load(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[float, list[float], int]:
    """``requests`` requests from ``clients`` concurrent clients; returns (wall seconds, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in counter:  # clients share one iterator: each request is sent once
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", content=bodies[i % len(bodies)], headers=JSON)
                errors += not response.is_success
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies, errors


def _serve(model: Path, port: int, max_batch: int, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.server_threads)}
    command = [sys.executable, "-m", "unified_vl.app.cli", "serve", "--model", str(model), "--port", str(port),
               "--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024",
               "--log-level", "warning"]  # fmt: skip
    if args.device:
        command += ["--device", args.device]
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder (default: an untrained --preset)")
    parser.add_argument("--preset", default="uvl-tiny")
    parser.add_argument("--device", default=None, help="the server's device (default: cuda when available)")
    parser.add_argument("--requests", type=int, default=192, help="requests per run (after a warm-up)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=16, help="the batching run's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from benchlib import machine_line, markdown_table, report, verdict

    batching = f"max-batch {args.max_batch}"
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else _untrained_model(args.preset, Path(tmp))
        bodies = _bodies(16, args.max_new_tokens)
        figures = {}
        for label, max_batch in ((batching, args.max_batch), ("max-batch 1", 1)):
            port = _free_port()
            server = _serve(model, port, max_batch, args)
            try:
                url = f"http://127.0.0.1:{port}"
                for clients in args.clients:
                    asyncio.run(_load(url, bodies, 2 * clients, clients))  # warm-up
                    wall, latencies, errors = asyncio.run(_load(url, bodies, args.requests, clients))
                    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
                    figures[label, clients] = {"rps": args.requests / wall, "p50": p50, "p99": p99, "errors": errors}
                    print(
                        f"{label} clients={clients}: {args.requests / wall:.1f} req/s, {errors} errors", file=sys.stderr
                    )
            finally:
                server.terminate()
                server.wait(timeout=60)

    rows = []
    for clients in args.clients:
        b, s = figures[batching, clients], figures["max-batch 1", clients]
        ratio = b["rps"] / s["rps"]
        ok = verdict(ratio, 3.0) if clients == 32 and b["errors"] == 0 else ("missed" if clients == 32 else "")
        rows.append([clients, f"{b['rps']:.1f}", f"{b['p50']:.0f} / {b['p99']:.0f}", b["errors"],
                     f"{s['rps']:.1f}", f"{s['p50']:.0f} / {s['p99']:.0f}", s["errors"], f"{ratio:.2f}x", ok])  # fmt: skip
    head = (
        f"{machine_line()}\nmodel {args.model or 'untrained ' + args.preset}, mixed vqa/captioning/rec/classification, "
        f"{args.requests} requests per run, max-new-tokens {args.max_new_tokens}, server threads {args.server_threads}\n"
    )
    headers = ["clients", f"{batching} req/s", "p50 / p99 ms", "errors", "max-batch 1 req/s", "p50 / p99 ms",
               "errors", "throughput ratio", "target (32: >= 3x, 0 errors)"]  # fmt: skip
    data = {"machine": machine_line(), "runs": {f"{k[0]}, {k[1]} clients": v for k, v in figures.items()}}
    report(args.out, head + "\n" + markdown_table(headers, rows), data)


if __name__ == "__main__":
    main()
