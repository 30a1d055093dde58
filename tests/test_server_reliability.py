"""The server under hostile input (issue #17): fuzzing from its own OpenAPI schema, a poison test,
and one test per way a bad request used to fail others or the server.

One uvicorn server for the module, over real HTTP, with the default `Limits` except the byte sizes.
"""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest
from test_inference import (  # noqa: F401  (served_model_dir is a fixture)
    EXPRESSION,
    QUESTION,
    scene_images,
    served_model_dir,
    torch_threads,
)
from test_server import ServerThread, b64, bomb_png, data_uri, png_bytes

API_KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def predictor(served_model_dir):  # noqa: F811
    from unified_vl import Predictor

    with torch_threads(1):
        yield Predictor.from_pretrained(served_model_dir, device="cpu", batch_size=32)


@pytest.fixture(scope="module")
def server(predictor):
    from unified_vl.app.inference.server import create_app

    # A wide batching window, so that concurrent requests share batches.
    app = create_app(predictor, max_batch=32, max_wait_ms=40, api_key=API_KEY, max_queue=256)
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def pngs():
    return [png_bytes(image) for image in scene_images()]


def good_requests(pngs) -> list[dict]:
    """Well-formed requests of several tasks and decodings, over the scene images."""
    out = []
    for i, png in enumerate(pngs):
        out += [
            {"task": "vqa", "image": b64(png), "question": QUESTION},
            {"task": "rec", "image": b64(png), "expression": EXPRESSION},
            {"task": "captioning", "image": b64(png), "max_new_tokens": 8 + i},
            {"task": "vqa", "image": b64(png), "question": "how many shapes?", "candidates": ["one", "two", "three"]},
        ]
    return out


def poisoned_requests(pngs) -> list[dict]:
    """Requests that used to fail inside a batch, taking the batch's good requests with them."""
    image = b64(pngs[0])
    return [
        {"task": "vqa", "image": image, "question": "what is \ud800 this?"},  # a lone surrogate: valid JSON
        {"task": "vqa", "image": image, "question": "q", "candidates": ["yes", "no</s>way"]},  # eos inside
        {"task": "rec", "image": image, "expression": "the thing", "max_new_tokens": 2},  # a box needs 5
        {"task": "vqa", "image": image, "question": "q", "candidates": ["word " * 200]},  # longer than any target
        {"task": "captioning", "image": b64(b"GIF89a not really")},
        {"task": "grounding", "image": image, "region": [0, 0, 9999, 5]},
        {"task": "classification", "image": image, "labels": ["\udfff"]},
    ]


def _prediction(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    prediction = dict(response.json()["prediction"])
    prediction["score"] = round(prediction["score"], 3)  # padding changes the summation order only
    return prediction


def _post_json(client: httpx.Client, body: dict) -> httpx.Response:
    # httpx's json= refuses lone surrogates; Python's json module writes them as \ud800 escapes.
    import json

    return client.post("/v1/predict", content=json.dumps(body), headers={"content-type": "application/json"})


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    import json

    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
        return await asyncio.gather(
            *(
                c.post("/v1/predict", content=json.dumps(b), headers={"content-type": "application/json"})
                for b in bodies
            )
        )


# -- the poison test ------------------------------------------------------------------------------
def test_poisoned_requests_never_change_a_good_answer(server, client, pngs):
    good, poison = good_requests(pngs), poisoned_requests(pngs)
    alone = [_prediction(_post_json(client, body)) for body in good]  # each good request on its own
    rng = random.Random(0)
    batches_before = _batch_count(client)
    rounds = 4
    for _ in range(rounds):
        bodies = [("good", i, body) for i, body in enumerate(good)] + [("poison", i, b) for i, b in enumerate(poison)]
        rng.shuffle(bodies)
        responses = asyncio.run(_post_all(server.url, [b for _, _, b in bodies]))
        for (kind, i, _), response in zip(bodies, responses, strict=True):
            if kind == "good":
                assert _prediction(response) == alone[i]
            else:
                assert response.status_code in (400, 422), (poison[i], response.text)
                assert set(response.json()["error"]) == {"message", "type", "param"}
    sent = rounds * (len(good) + len(poison))
    assert _batch_count(client) - batches_before < sent / 2, "the requests did not share batches"


def _batch_count(client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "unified_vl_batch_size_count":
                return sample.value
    return 0.0


def test_a_query_that_fails_in_its_batch_fails_alone(predictor):
    """Defence in depth below the schema: a query that breaks its batch is rerun alone, the others too."""
    import dataclasses

    images = scene_images()
    good = [predictor.query("vqa", image, {"question": QUESTION}) for image in images]
    bad = dataclasses.replace(good[0], prompt="question: \ud800?")  # a prompt no tokenizer takes
    with torch_threads(1):
        alone = [predictor.run([q])[0] for q in good]
        mixed = predictor.run([good[0], bad, *good[1:]])
    assert isinstance(mixed[1], Exception)
    for got, want in zip([mixed[0], *mixed[2:]], alone, strict=True):
        assert got.text == want.text and got.score == pytest.approx(want.score, abs=1e-4)


# -- fuzzing from /openapi.json ---------------------------------------------------------------------
class GoodTraffic:
    """A thread sending good requests while the fuzzer runs; each answer must equal the one it got alone."""

    def __init__(self, url: str, bodies: list[dict], expected: list[dict]):
        self.url, self.bodies, self.expected = url, bodies, expected
        self.sent, self.wrong = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as c:
            while not self._stop.is_set():
                i = self.sent % len(self.bodies)
                response = c.post("/v1/predict", json=self.bodies[i])
                self.sent += 1
                got = _prediction(response) if response.status_code == 200 else response.text
                if got != self.expected[i]:
                    self.wrong.append((self.bodies[i]["task"], got, self.expected[i]))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)


def test_fuzzing_from_the_openapi_schema_never_gives_a_server_error(server, client, pngs):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    good = good_requests(pngs)[:4]
    expected = [_prediction(client.post("/v1/predict", json=body)) for body in good]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    calls = {"n": 0, "statuses": set()}

    def fuzz(operation, mode) -> None:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=8, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        def run(case):
            response = case.call(base_url=server.url, headers=AUTH, timeout=60)
            calls["n"] += 1
            calls["statuses"].add(response.status_code)
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param"} and error["message"]
            case.validate_response(response, checks=checks, headers=AUTH)

        run()

    with GoodTraffic(server.url, good, expected) as traffic:
        for result in schema.get_all_operations():
            operation = result.ok()
            modes = [schemathesis.GenerationMode.POSITIVE]
            if operation.method.upper() == "POST":
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:
                fuzz(operation, mode)
    assert calls["n"] >= 40 and {200, 422} <= calls["statuses"], calls
    assert traffic.sent > 0 and traffic.wrong == []


def test_openapi_describes_each_task_body_json_and_multipart(client):
    from unified_vl.app.inference.predictor import known_tasks

    document = client.get("/openapi.json").json()
    body = document["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    union = body["application/json"]["schema"]
    assert union["discriminator"]["propertyName"] == "task"
    assert len(union["oneOf"]) == len(known_tasks())
    vqa = document["components"]["schemas"]["Predict_Vqa"]
    assert set(vqa["required"]) == {"task", "image", "question"} and vqa["additionalProperties"] is False
    assert vqa["properties"]["num_beams"]["anyOf"][0]["maximum"] == 8
    form = body["multipart/form-data"]["schema"]
    assert form["properties"]["image"]["format"] == "binary" and form["properties"]["task"]["enum"] == known_tasks()
    chat = document["components"]["schemas"]["ChatRequest"]
    assert "messages" in chat["required"] and chat["additionalProperties"] is False


# -- one test per bullet of the issue -----------------------------------------------------------------
def test_a_lone_surrogate_is_a_422_naming_the_field(client, pngs):
    response = _post_json(client, {"task": "vqa", "image": b64(pngs[0]), "question": "a\ud800b"})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "question"
    assert "unicode" in response.json()["error"]["message"].lower()


@pytest.mark.parametrize("value", ["²", "--3", "3.5", "", "1e3"])
@pytest.mark.parametrize("name", ["max_new_tokens", "num_beams", "top_k"])
def test_integer_options_that_int_refuses_are_422_in_a_form_and_keep_the_connection(client, pngs, name, value):
    response = client.post(
        "/v1/predict", data={"task": "captioning", name: value}, files={"image": ("s.png", pngs[0], "image/png")}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == name
    assert response.headers.get("connection") != "close"


@pytest.mark.parametrize("value", ["²", "--3", "3", 2.5, True, None, [3]])
def test_integer_options_must_be_json_integers(client, pngs, value):
    response = _post_json(client, {"task": "captioning", "image": b64(pngs[0]), "num_beams": value})
    if value is None:  # null: the default
        assert response.status_code == 200
        return
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "num_beams"


def test_json_nested_too_deeply_is_a_400(client):
    response = client.post("/v1/predict", content=b"[" * 200_000, headers={"content-type": "application/json"})
    assert response.status_code == 400 and "nested too deeply" in response.json()["error"]["message"]


def test_a_file_part_where_a_text_field_belongs_is_422(client, pngs):
    response = client.post(
        "/v1/predict",
        data={"task": "vqa", "question": QUESTION},
        files=[("candidates", ("c.txt", b"yes", "text/plain"))],
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "candidates"


def test_form_lists_repeat_or_are_json_and_equal_the_json_answer(client, pngs):
    image = ("s.png", pngs[1], "image/png")
    candidates = ["red", "blue", "green"]
    as_json = client.post(
        "/v1/predict", json={"task": "vqa", "image": b64(pngs[1]), "question": QUESTION, "candidates": candidates}
    )
    repeated = client.post(
        "/v1/predict", data={"task": "vqa", "question": QUESTION, "candidates": candidates}, files={"image": image}
    )
    one_array = client.post(
        "/v1/predict",
        data={"task": "vqa", "question": QUESTION, "candidates": '["red", "blue", "green"]'},
        files={"image": image},
    )
    assert _prediction(as_json) == _prediction(repeated) == _prediction(one_array)
    twice = client.post("/v1/predict", data={"task": "vqa", "question": ["a", "b"]}, files={"image": image})
    assert twice.status_code == 422 and twice.json()["error"]["param"] == "question"


def test_images_over_the_pixel_limit_are_refused_before_decoding(client):
    from unified_vl.app.inference.schema import Limits

    assert Limits().max_image_pixels == 4096 * 4096
    response = client.post("/v1/predict", json={"task": "captioning", "image": b64(bomb_png(side=4100))})
    assert response.status_code == 400
    assert str(Limits().max_image_pixels) in response.json()["error"]["message"]


@pytest.mark.parametrize("name, count", [("labels", 101), ("candidates", 4097)])
def test_labels_and_candidates_are_capped(client, pngs, name, count):
    body = {"task": "classification", "image": b64(pngs[0]), name: [f"w{i}" for i in range(count)]}
    response = client.post("/v1/predict", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == name


def test_limits_are_serve_options_with_the_same_defaults():
    import dataclasses

    from unified_vl.app.inference.cli import build_serve_parser
    from unified_vl.app.inference.schema import Limits

    args = vars(build_serve_parser().parse_args(["--model", "m", "--max-labels", "7"]))
    defaults = Limits()
    for f in dataclasses.fields(Limits):
        if f.name not in ("max_image_bytes", "max_body_bytes"):
            assert args[f.name] == (7 if f.name == "max_labels" else getattr(defaults, f.name))
    with pytest.raises(ValueError, match="max_labels"):
        Limits(max_labels=0)


def test_a_smaller_label_limit_changes_the_schema_and_the_answer(predictor, pngs):
    from unified_vl.app.inference.schema import Limits
    from unified_vl.app.inference.server import create_app

    app = create_app(predictor, limits=Limits(max_labels=2))
    with ServerThread(app) as running:
        body = {"task": "classification", "image": b64(pngs[0]), "labels": ["a", "b", "c"]}
        response = httpx.post(f"{running.url}/v1/predict", json=body, timeout=60)
        assert response.status_code == 422 and response.json()["error"]["param"] == "labels"
        schema = httpx.get(f"{running.url}/openapi.json").json()["components"]["schemas"]["Predict_Classification"]
        assert schema["properties"]["labels"]["anyOf"][0]["maxItems"] == 2


def test_chat_usage_counts_the_prompt_tokens_after_truncation(client, predictor, pngs):
    long_text = " ".join(["describe the shapes and their colours"] * 60)  # far over 128 tokens
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": long_text},
                {"type": "image_url", "image_url": {"url": data_uri(pngs[0])}},
            ],
        }
    ]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    max_text = predictor.processor.max_text_length
    assert len(predictor.processor.tokenizer(long_text)["input_ids"]) > max_text
    assert usage["prompt_tokens"] == max_text + predictor.model.visual.num_patches


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "²"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
    ],
)
def test_chat_fields_are_validated_by_the_schema(client, body, param):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
