"""The HTTP server, over real HTTP: uvicorn on a free loopback port, httpx and the `openai` client.

One server for the module (the model of tests/test_inference.py); a second, deliberately slow
one with a one-slot queue for the 429 test.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_inference import (  # noqa: F401  (served_model_dir is a fixture)
    ANSWERS,
    EXPRESSION,
    LABELS,
    QUESTION,
    scene_images,
    served_model_dir,
    torch_threads,
)

API_KEY = "test-key"
MAX_IMAGE_BYTES = 64 * 1024
MAX_BODY_BYTES = 128 * 1024


class ServerThread:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))  # port 0: the OS picks a free port, no race
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server sees the very pixels we keep
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def bomb_png(side: int = 100_000) -> bytes:
    """A 200-byte PNG declaring side x side pixels: Pillow's bomb check fires on the header alone."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale (PNG spec, IHDR)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def predictor(served_model_dir):  # noqa: F811
    from unified_vl import Predictor

    with torch_threads(1):
        yield Predictor.from_pretrained(served_model_dir, device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def server(predictor):
    from unified_vl.app.inference.server import create_app

    app = create_app(
        predictor,
        max_batch=32,
        max_wait_ms=50,
        api_key=API_KEY,
        max_queue=64,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=MAX_BODY_BYTES,
    )
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def images():
    return scene_images()


@pytest.fixture(scope="module")
def pngs(images):
    return [png_bytes(image) for image in images]


def _without_scores(prediction: dict) -> dict:
    out = {k: v for k, v in prediction.items() if k != "score"}
    if "top_k" in out:
        out["top_k"] = [{"label": item["label"]} for item in out["top_k"]]
    return out


def _assert_matches(served: dict, expected) -> None:
    want = expected.to_dict()
    assert _without_scores(served) == _without_scores(want)
    assert served["score"] == pytest.approx(want["score"], abs=1e-4)


def _metrics(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# -- endpoints ----------------------------------------------------------------------------------
def test_health_models_and_metrics(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == predictor.name
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == predictor.name
    assert models["data"][0]["tasks"]["vqa"] == ["question"]
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "unified_vl_requests_total",
        "unified_vl_batch_size",
        "unified_vl_queue_depth",
        "unified_vl_request_latency_seconds",
    ):
        assert name in metrics.text


@pytest.mark.parametrize(
    "task, fields, method, args, options",
    [
        ("captioning", {}, "caption", (), {}),
        ("vqa", {"question": QUESTION}, "answer", (QUESTION,), {}),
        ("vqa", {"question": QUESTION, "candidates": ANSWERS}, "answer", (QUESTION,), {"candidates": ANSWERS}),
        ("rec", {"expression": EXPRESSION}, "locate", (EXPRESSION,), {}),
        ("classification", {"labels": LABELS, "top_k": 2}, "classify", (), {"labels": LABELS, "top_k": 2}),
        ("detection", {"max_new_tokens": 12}, "detect", (), {"max_new_tokens": 12}),
        ("generate", {"prompt": "describe.", "num_beams": 2}, "generate", ("describe.",), {"num_beams": 2}),
    ],
)
def test_predict_json_equals_the_python_api(client, predictor, images, pngs, task, fields, method, args, options):
    response = client.post("/v1/predict", json={"task": task, "image": b64(pngs[1]), **fields})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["task"] == task and body["model"] == predictor.name
    _assert_matches(body["prediction"], getattr(predictor, method)(images[1], *args, **options)[0])


def test_predict_multipart_and_data_uri(client, predictor, images, pngs):
    expected = predictor.classify(images[2], labels=LABELS, top_k=3)[0]
    multipart = client.post(
        "/v1/predict",
        data={"task": "classification", "labels": LABELS, "top_k": "3"},
        files={"image": ("scene.png", pngs[2], "image/png")},
    )
    assert multipart.status_code == 200, multipart.text
    _assert_matches(multipart.json()["prediction"], expected)
    uri = client.post(
        "/v1/predict", json={"task": "classification", "image": data_uri(pngs[2]), "labels": LABELS, "top_k": 3}
    )
    assert uri.json()["prediction"] == multipart.json()["prediction"]


def test_chat_completions_with_the_openai_client(server, predictor, images, pngs):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    prompt = "what does the image describe?"
    messages = [
        {"role": "system", "content": "You are helpful."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": {"url": data_uri(pngs[0])}},
            ],
        },
    ]
    expected = predictor.generate(images[0], prompt)[0].text
    assert expected, "the trained model writes a caption here"

    completion = client.chat.completions.create(model=predictor.name, messages=messages, max_tokens=40)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model=predictor.name, messages=messages, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == completion.usage.total_tokens

    assert [m.id for m in client.models.list()] == [predictor.name]


def test_stream_is_server_sent_events_ending_in_done(client, pngs):
    body = {
        "model": "served-model",
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(pngs[0])}},
                    {"type": "text", "text": "describe."},
                ],
            }
        ],
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


# -- dynamic batching ---------------------------------------------------------------------------
def test_32_concurrent_requests_are_answered_correctly_in_batches(server, client, predictor, images, pngs):
    requests = []
    for i in range(32):
        k = i % len(images)
        task, fields, method, args = [
            ("captioning", {}, "caption", ()),
            ("vqa", {"question": QUESTION}, "answer", (QUESTION,)),
            ("rec", {"expression": EXPRESSION}, "locate", (EXPRESSION,)),
        ][i % 3]
        requests.append(
            ({"task": task, "image": b64(pngs[k]), **fields}, getattr(predictor, method)(images[k], *args)[0])
        )
    before = _metrics(client)

    async def send_all():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as async_client:
            return await asyncio.gather(*(async_client.post("/v1/predict", json=body) for body, _ in requests))

    responses = asyncio.run(send_all())
    for response, (_, expected) in zip(responses, requests, strict=True):
        assert response.status_code == 200, response.text
        _assert_matches(response.json()["prediction"], expected)

    after = _metrics(client)
    batches = after[("unified_vl_batch_size_count", ())] - before[("unified_vl_batch_size_count", ())]
    singles = (
        after[("unified_vl_batch_size_bucket", (("le", "1.0"),))]
        - before[("unified_vl_batch_size_bucket", (("le", "1.0"),))]
    )
    queries = after[("unified_vl_batch_size_sum", ())] - before[("unified_vl_batch_size_sum", ())]
    assert queries == 32
    assert batches < 32 and batches - singles >= 1, f"{batches} batches, {singles} of size 1"
    ok = (("endpoint", "/v1/predict"), ("status", "200"))
    assert after[("unified_vl_requests_total", ok)] - before.get(("unified_vl_requests_total", ok), 0) == 32


# -- bad input ----------------------------------------------------------------------------------
def _truncated_png(pngs) -> bytes:
    return pngs[0][: len(pngs[0]) // 2]


BAD_REQUESTS = {
    # name: (kwargs of client.post to /v1/predict, or a (path, kwargs) pair; status; error param)
    "not an image": (lambda p: {"json": {"task": "captioning", "image": b64(b"just some text")}}, 400, "image"),
    "invalid base64": (lambda p: {"json": {"task": "captioning", "image": "%%% not base64 %%%"}}, 400, "image"),
    "corrupt image": (lambda p: {"json": {"task": "captioning", "image": b64(_truncated_png(p))}}, 400, "image"),
    "decompression bomb": (lambda p: {"json": {"task": "captioning", "image": b64(bomb_png())}}, 400, "image"),
    "bomb as a file": (lambda p: {"data": {"task": "captioning"}, "files": {"image": ("b.png", bomb_png())}}, 400, "image"),
    "image over the limit": (lambda p: {"data": {"task": "captioning"}, "files": {"image": ("i.png", b"\0" * (MAX_IMAGE_BYTES + 1))}}, 413, "image"),
    "base64 image over the limit": (lambda p: {"json": {"task": "captioning", "image": b64(b"\0" * (MAX_IMAGE_BYTES + 100))}}, 413, "image"),
    "body over the limit": (lambda p: {"content": b"{" + b" " * MAX_BODY_BYTES + b"}", "headers": {"content-type": "application/json"}}, 413, None),
    "chunked body over the limit": (lambda p: {"content": iter([b"{", b" " * MAX_BODY_BYTES, b"}"]), "headers": {"content-type": "application/json"}}, 413, None),
    "invalid JSON": (lambda p: {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, None),
    "body not an object": (lambda p: {"json": ["captioning"]}, 422, None),
    "unknown task": (lambda p: {"json": {"task": "painting", "image": b64(p[0])}}, 422, "task"),
    "missing task": (lambda p: {"json": {"image": b64(p[0])}}, 422, "task"),
    "missing image": (lambda p: {"json": {"task": "captioning"}}, 422, "image"),
    "missing field": (lambda p: {"json": {"task": "vqa", "image": b64(p[0])}}, 422, "question"),
    "wrong-typed field": (lambda p: {"json": {"task": "vqa", "image": b64(p[0]), "question": 42}}, 422, "question"),
    "wrong-typed image": (lambda p: {"json": {"task": "vqa", "image": [1, 2], "question": "q"}}, 422, "image"),
    "unknown field": (lambda p: {"json": {"task": "captioning", "image": b64(p[0]), "colour": "red"}}, 422, "colour"),
    "bad option": (lambda p: {"json": {"task": "captioning", "image": b64(p[0]), "num_beams": 1000}}, 422, "num_beams"),
    "top_k without labels": (lambda p: {"json": {"task": "classification", "image": b64(p[0]), "top_k": 2}}, 422, "top_k"),
    "region outside the image": (lambda p: {"json": {"task": "grounding", "image": b64(p[0]), "region": [0, 0, 999, 9]}}, 422, "region"),
    "missing key": (lambda p: {"json": {"task": "captioning", "image": b64(p[0])}, "headers": {"Authorization": ""}}, 401, None),
    "wrong key": (lambda p: {"json": {"task": "captioning", "image": b64(p[0])}, "headers": {"Authorization": "Bearer nope"}}, 401, None),
    "chat without messages": (lambda p: ("/v1/chat/completions", {"json": {"model": "m"}}), 422, "messages"),
    "chat with an http image": (
        lambda p: ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]}}),
        422, "messages[0].content[1].image_url.url",
    ),
    "chat with a corrupt image": (
        lambda p: ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(b"GIF89a broken")}}]}]}}),
        400, "messages[0].content[1].image_url.url",
    ),
    "chat without an image": (lambda p: ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "hi"}]}}), 422, "messages"),
    "chat with n=2": (
        lambda p: ("/v1/chat/completions", {"json": {"n": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": data_uri(p[0])}}]}]}}),
        422, "n",
    ),
    "unknown path": (lambda p: ("/v1/nothing", {"json": {}}), 404, None),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_a_json_error_and_the_next_good_request_succeeds(client, predictor, images, pngs, name):
    make, status, param = BAD_REQUESTS[name]
    request = make(pngs)
    path, kwargs = request if isinstance(request, tuple) else ("/v1/predict", request)
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param"} and error["message"]
    assert error["param"] == param
    good = client.post("/v1/predict", json={"task": "vqa", "image": b64(pngs[3]), "question": QUESTION})
    assert good.status_code == 200
    _assert_matches(good.json()["prediction"], predictor.answer(images[3], QUESTION)[0])


def test_errors_are_counted_in_metrics(client, pngs):
    before = _metrics(client)
    client.post("/v1/predict", json={"task": "painting", "image": b64(pngs[0])})
    after = _metrics(client)
    key = ("unified_vl_request_errors_total", (("endpoint", "/v1/predict"), ("type", "invalid_request_error")))
    assert after[key] - before.get(key, 0) == 1


def test_a_full_queue_answers_429_and_recovers(predictor, pngs):
    from unified_vl.app.inference.server import create_app

    class Slow:
        """The predictor, slowed down so that requests pile up."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, queries):
            time.sleep(0.3)
            return self.inner.run(queries)

    app = create_app(Slow(predictor), max_batch=1, max_wait_ms=0, max_queue=1)
    body = {"task": "vqa", "image": b64(pngs[0]), "question": QUESTION}

    async def burst(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as async_client:
            return await asyncio.gather(*(async_client.post("/v1/predict", json=body) for _ in range(6)))

    with ServerThread(app) as server:
        codes = sorted(r.status_code for r in asyncio.run(burst(server.url)))
        assert codes[0] == 200 and codes[-1] == 429, codes
        refused = next(r for r in asyncio.run(burst(server.url)) if r.status_code == 429)
        assert refused.json()["error"]["type"] == "rate_limit_error" and refused.headers["retry-after"] == "1"
        assert httpx.post(f"{server.url}/v1/predict", json=body, timeout=30).status_code == 200


def test_serve_binds_loopback_by_default():
    from unified_vl.app.inference.cli import build_serve_parser

    args = build_serve_parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.max_batch, args.max_wait_ms) == ("127.0.0.1", 8000, 16, 10.0)
