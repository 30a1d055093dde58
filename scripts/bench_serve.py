"""Requests/s and p50/p99 latency of `unified-vl serve`, with dynamic batching and with --max-batch 1.

    python scripts/bench_serve.py                      # untrained uvl-tiny, CPU, 192 requests per run
    python scripts/bench_serve.py --model runs/main/model --device cuda --requests 512

Starts the real server (a subprocess, as users run it) once with ``--max-batch 16`` and once with
``--max-batch 1``, and at 1 and 32 concurrent clients sends ``/v1/predict`` vqa requests (a
640x480 JPEG each, base64 in JSON). Prints requests/s, p50 and p99 latency for each of the four
runs and the ratios batching / no batching. At 1 client both are the same (a lone request
waits up to --max-wait-ms for company); at 32 clients batching multiplies throughput and cuts
latency. Measured (untrained models, 16 new tokens, 192/256 requests per run):

    uvl-tiny, 2 shared CPU cores        req/s  p50 ms  p99 ms
      max-batch 16, 1 / 32 clients       14.0    63     106  /  72.3   407   681
      max-batch 1,  1 / 32 clients       15.0    61     103  /  16.9  1833  2199   -> x4.3 req/s at 32
    uvl-base, one H100 (--device cuda --server-threads 4)
      max-batch 16, 1 / 32 clients        4.6   208     289  /  38.6   783  1165
      max-batch 1,  1 / 32 clients        4.7   205     283  /   5.1  6324  7423   -> x7.6 req/s at 32

(On the GPU a request is bound by kernel launches, not arithmetic: batching amortises them.)

Without --model the model is an untrained preset (--preset), saved to a temporary folder; it
never writes end-of-sequence, so every request decodes exactly --max-new-tokens tokens, a fixed
workload. The server process gets --server-threads torch threads (OMP_NUM_THREADS): on a small
shared CPU, more threads than free cores make torch spin instead of compute.
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
        body = {
            "task": "vqa",
            "image": base64.b64encode(buffer.getvalue()).decode(),
            "question": f"what color is shape number {i}?",
            "max_new_tokens": max_new_tokens,
        }
        bodies.append(json.dumps(body).encode())
    return bodies


async def _load(url: str, bodies: list[bytes], requests: int, clients: int) -> tuple[float, list[float]]:
    """``requests`` requests from ``clients`` concurrent clients; returns (wall seconds, latencies)."""
    latencies: list[float] = []
    counter = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:  # clients share one iterator: each request is sent once
            start = time.perf_counter()
            response = await http.post("/v1/predict", content=bodies[i % len(bodies)], headers=JSON)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - start, latencies


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
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-batch", type=int, default=16, help="the batching run's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else _untrained_model(args.preset, Path(tmp))
        bodies = _bodies(16, args.max_new_tokens)
        rows = {}
        for label, max_batch in ((f"batching (max-batch {args.max_batch})", args.max_batch), ("max-batch 1", 1)):
            port = _free_port()
            server = _serve(model, port, max_batch, args)
            try:
                url = f"http://127.0.0.1:{port}"
                for clients in args.clients:
                    asyncio.run(_load(url, bodies, 2 * clients, clients))  # warm-up
                    wall, latencies = asyncio.run(_load(url, bodies, args.requests, clients))
                    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
                    rows[label, clients] = (args.requests / wall, p50, p99)
                    print(f"{label:24s} clients={clients:3d}  {args.requests / wall:8.1f} req/s  "
                          f"p50 {p50:8.1f} ms  p99 {p99:8.1f} ms", flush=True)  # fmt: skip
            finally:
                server.terminate()
                server.wait(timeout=60)

    print(f"\nmodel {model.name}, {args.requests} requests per run, max-new-tokens {args.max_new_tokens}")
    print(f"{'':24s} {'clients':>7s} {'req/s':>9s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for (label, clients), (rps, p50, p99) in rows.items():
        print(f"{label:24s} {clients:7d} {rps:9.1f} {p50:9.1f} {p99:9.1f}")
    batching = f"batching (max-batch {args.max_batch})"
    for clients in args.clients:
        b, s = rows[batching, clients], rows["max-batch 1", clients]
        print(f"ratio batching / max-batch 1 at {clients} clients: throughput x{b[0] / s[0]:.2f}, "
              f"p50 x{b[1] / s[1]:.2f}, p99 x{b[2] / s[2]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
