"""Fuzz the HTTP server from its own /openapi.json with schemathesis, good requests running alongside.

    python scripts/fuzz_serve.py --out fuzz.json                  # ~6 min on 2 idle cores, ~2,600 fuzzed requests
    python scripts/fuzz_serve.py --quick --out /tmp/fuzz.json     # ~1 min, a hundred-odd fuzzed requests

Starts `unified-vl serve`'s app (default limits, an API key) on a free loopback port with a small
uvicorn model (``--model``, or a randomly initialised uvl-tiny built here: the fuzzer tests the
server, not the answers), then runs ``st run`` (the schemathesis command line) against it: every
phase (examples, coverage, fuzzing; --quick skips coverage), every check except ``positive_data_acceptance`` (a string that
fits the schema is rarely a decodable image, so a schema-valid request may rightly get 400), and
413 counted as a rejection of schema-violating data (an oversized body is refused before it is
read). Meanwhile a thread sends good requests and compares each answer with the one it got alone.

Expect schemathesis' summary (every operation passed), then a Markdown table of the requests the
server answered during the run by endpoint and status (from its Prometheus counters), the good
traffic's count with 0 wrong answers, and "OK"; the exit status is 0 only when there were 0 server
errors (5xx), 0 wrong good answers, schemathesis found no failure and, without --quick, at least
2,000 requests were fuzzed. The summary is also written as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

API_KEY = "fuzz"


def build_model(folder: Path) -> Path:
    """A randomly initialised uvl-tiny model folder (seed 0): the server's behaviour, not its answers, is tested."""
    import torch

    from unified_vl.checkpoint import save_pretrained
    from unified_vl.config import UnifiedVLConfig
    from unified_vl.modeling import build_model as build
    from unified_vl.processor import UnifiedVLProcessor
    from unified_vl.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    config = UnifiedVLConfig.from_preset("uvl-tiny", text_config={"vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = build(config, tokenizer)
    processor = UnifiedVLProcessor.from_config(config, tokenizer, vision_backbone=model.visual.backbone)
    return save_pretrained(model, processor, folder)


class Server:
    """uvicorn serving the app in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def good_requests() -> list[dict]:
    """Well-formed requests of several tasks and decodings over small generated images."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(buffer, format="PNG")
        image = base64.b64encode(buffer.getvalue()).decode()
        out += [
            {"task": "vqa", "image": image, "question": "what color is the circle?"},
            {"task": "rec", "image": image, "expression": "the red circle"},
            {"task": "captioning", "image": image, "max_new_tokens": 6},
            {"task": "classification", "image": image, "labels": ["circle", "square", "cross"], "top_k": 2},
        ]
    return out


class GoodTraffic:
    """Sends good requests in a loop; each answer must equal the one the same request got alone."""

    def __init__(self, url: str, bodies: list[dict], expected: list[dict]):
        self.url, self.bodies, self.expected = url, bodies, expected
        self.sent, self.wrong = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
            while not self._stop.is_set():
                i = self.sent % len(self.bodies)
                got = answer(c.post("/v1/predict", json=self.bodies[i]))
                self.sent += 1
                if got != self.expected[i]:
                    self.wrong.append({"request": self.bodies[i]["task"], "got": got, "expected": self.expected[i]})
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=120)


def answer(response) -> dict | str:
    if response.status_code != 200:
        return f"{response.status_code} {response.text[:200]}"
    prediction = dict(response.json()["prediction"])
    prediction["score"] = round(prediction["score"], 3)  # batching changes the summation order only
    if "top_k" in prediction:
        prediction["top_k"] = [
            {"label": item["label"], "score": round(item["score"], 3)} for item in prediction["top_k"]
        ]
    return prediction


def request_counts(url: str) -> dict[tuple[str, str], float]:
    """``{(endpoint, status): requests}`` from the server's Prometheus counters."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "unified_vl_requests_total":
                out[(sample.labels["endpoint"], sample.labels["status"])] = sample.value
    return out


def run_schemathesis(url: str, *, max_examples: int, seed: int, workdir: Path, quick: bool) -> tuple[int, str]:
    config = workdir / "schemathesis.toml"
    config.write_text(
        "[checks.negative_data_rejection]\n"
        "# 413: a body over the size limit is refused before it is read, like any other bad request\n"
        "expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]\n"
    )
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {API_KEY}",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--max-examples",
        str(max_examples),
        "--seed",
        str(seed),
        "--workers",
        "2",
        "--continue-on-failure",
        "--request-timeout",
        "120",
        "--no-color",
    ]
    if quick:  # the coverage phase alone sends over a thousand requests
        command += ["--phases", "examples,fuzzing"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env={**os.environ, "NO_COLOR": "1"})
    return result.returncode, result.stdout + result.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the summary")
    parser.add_argument("--model", default=None, help="a model folder (default: a random uvl-tiny built here)")
    parser.add_argument("--max-examples", type=int, default=None, help="per operation (default: 500, --quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a short run that checks the whole pipeline")
    args = parser.parse_args(argv)
    max_examples = args.max_examples or (10 if args.quick else 500)

    import httpx
    import torch

    from unified_vl.app.inference.predictor import Predictor
    from unified_vl.app.inference.server import create_app

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fuzz-serve-") as tmp:
        workdir = Path(tmp)
        model = Path(args.model) if args.model else build_model(workdir / "model")
        predictor = Predictor.from_pretrained(model, device="cpu", batch_size=16)
        app = create_app(predictor, max_batch=16, max_wait_ms=10, api_key=API_KEY, max_queue=256)
        with Server(app) as server:
            bodies = good_requests()
            headers = {"Authorization": f"Bearer {API_KEY}"}
            expected = [
                answer(httpx.post(f"{server.url}/v1/predict", json=b, headers=headers, timeout=120)) for b in bodies
            ]
            before = request_counts(server.url)
            start = time.perf_counter()
            with GoodTraffic(server.url, bodies, expected) as traffic:
                st_status, st_output = run_schemathesis(
                    server.url, max_examples=max_examples, seed=args.seed, workdir=workdir, quick=args.quick
                )
            seconds = time.perf_counter() - start
            after = request_counts(server.url)
    return report(args, before, after, traffic, st_status, st_output, seconds)


def report(args, before, after, traffic, st_status, st_output, seconds) -> int:
    counts = {key: int(after[key] - before.get(key, 0)) for key in after if after[key] - before.get(key, 0)}
    total = sum(counts.values())
    fuzzed = total - traffic.sent
    server_errors = sum(n for (_, status), n in counts.items() if status.startswith("5"))
    summary_text = st_output[st_output.rfind("SUMMARY") :] if "SUMMARY" in st_output else st_output[-3000:]
    cases = re.search(r"(\d+) generated", summary_text)
    print("schemathesis" + ("" if st_status == 0 else f" (exit status {st_status})") + ":")
    print("  " + "\n  ".join(line for line in summary_text.splitlines() if line.strip()))
    if st_status != 0:
        print(st_output[-6000:])
    lines = ["| endpoint | status | requests |", "|---|---|---:|"]
    lines += [f"| {endpoint} | {status} | {n} |" for (endpoint, status), n in sorted(counts.items())]
    print("\n" + "\n".join(lines))
    print(
        f"\n{total} requests in {seconds:.0f} s: {fuzzed} fuzzed ({cases.group(1) if cases else '?'} schemathesis "
        f"test cases), {traffic.sent} good alongside; {server_errors} server errors (5xx); "
        f"{len(traffic.wrong)} good answers differed from the answer alone"
    )
    enough = args.quick or fuzzed >= 2000
    ok = st_status == 0 and server_errors == 0 and not traffic.wrong and traffic.sent > 0 and enough
    summary = {
        "requests": total,
        "fuzzed_requests": fuzzed,
        "schemathesis_test_cases": int(cases.group(1)) if cases else None,
        "schemathesis_exit_status": st_status,
        "server_errors": server_errors,
        "good_requests": traffic.sent,
        "good_answers_wrong": traffic.wrong,
        "by_endpoint_and_status": {f"{e} {s}": n for (e, s), n in sorted(counts.items())},
        "seconds": round(seconds, 1),
        "max_examples": args.max_examples,
        "seed": args.seed,
        "ok": ok,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print("OK" if ok else "FAILED" + ("" if enough else f": only {fuzzed} fuzzed requests, fewer than 2,000"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
