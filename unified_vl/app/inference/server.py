"""The HTTP server: FastAPI app with dynamic batching and an OpenAI-compatible chat endpoint.

    unified-vl serve --model runs/main/model --port 8000
    curl -s localhost:8000/v1/predict -F task=vqa -F question="what color is the circle?" -F image=@scene.png

Endpoints:

* ``POST /v1/predict``: ``{"task", "image", <task fields>, <options>}`` as JSON (``image`` base64
  or a ``data:`` URI) or multipart (``image`` a file part). Task fields are the task's input
  fields (``question`` for vqa, ``expression`` for rec, ``caption`` for grounding, ``prompt``
  for ``generate``; ``GET /v1/models`` lists them); options are ``candidates``, ``labels``,
  ``top_k``, ``num_beams`` and ``max_new_tokens``; ``model`` picks an adapter (below); ``method``
  with ``method_options`` names a method that reads answers its own way (``{"task": "rec",
  "method": "cpt", "expression": ..., "candidate_boxes": [[x1, y1, x2, y2], ...]}``: CPT colour
  prompts choose a candidate). Answers
  ``{"task", "model", "prediction"}``.
* ``POST /v1/chat/completions``: the OpenAI Chat Completions API (API reference,
  https://platform.openai.com/docs/api-reference/chat/create). The last user message's ``text``
  parts, joined, are the instruction, used as written (no task template); its ``image_url``
  part (a ``data:`` URI, RFC 2397; the server fetches nothing) is the image, or the latest image
  of an earlier user message. A message with several ``image_url`` parts is an interleaved
  prompt: each image goes where its part is among the text parts (as an ``<image>``
  placeholder; Frozen's few-shot format ``image, "this is a dax.", image, "what is this?"``); the
  text must not hold ``<image>`` itself. ``max_tokens`` / ``max_completion_tokens`` bound the output;
  decoding is greedy and deterministic, so sampling options (``temperature``, ``top_p``, ``seed``)
  are accepted and have no effect; ``n`` must be 1. ``stream: true`` answers with Server-Sent
  Events (WHATWG HTML, "Server-sent events"): ``data: <chunk JSON>`` events, then
  ``data: [DONE]``, as OpenAI streams. The text arrives in one content chunk once its batch has
  run: outputs are batched, not produced token by token.
* ``GET /health``, ``GET /v1/models``, ``GET /metrics`` (Prometheus text format).

Every field of both POST bodies, JSON or multipart, is validated by one schema layer,
:mod:`unified_vl.app.inference.schema` (which also writes the bodies into ``/openapi.json``), and
each request's image is decoded and its text tokenized in its own thread before it joins a batch:
one bad request never fails another. What a request may cost is the server's `Limits`.

Adapters (``unified-vl serve --adapter name=path``): the ``model`` field of a request picks one by
name, the base model by its own name or by leaving ``model`` out (vLLM's convention for LoRA
adapters); ``/v1/models`` lists the base, then each adapter with ``parent`` (the base) and
``root`` (its folder). One dynamic batch may mix adapters (``Predictor.run``). An unknown name
answers 404 and the server goes on serving.

Concurrent requests are gathered into batches by :class:`~unified_vl.app.inference.batcher.DynamicBatcher`;
a full queue answers 429. Errors are ``{"error": {"message", "type", "param"}}`` (OpenAI's error
shape): an undecodable, corrupt or decompression-bomb image -> 400; an image or body over its size
limit -> 413; unknown task, missing or wrong-typed field -> 422; a missing or wrong API key, when
one is set -> 401 (``Authorization: Bearer KEY``; ``/health`` and ``/metrics`` stay open for
probes and scrapers); an unknown ``model`` -> 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hmac
import io
import json
import time
import urllib.parse
import uuid
import warnings
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from unified_vl.app.inference.batcher import DynamicBatcher, QueueFullError
from unified_vl.app.inference.predictor import GENERATE, InputError, Predictor, input_fields, known_tasks
from unified_vl.app.inference.schema import Limits, MiB, RequestSchema, SchemaError
from unified_vl.processor import ImageLoadError
from unified_vl.tokenizer import IMAGE_TOKEN

__all__ = ["ApiError", "Limits", "MiB", "create_app", "decode_image"]
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/predict", "/v1/chat/completions")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.headers = headers


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(422, message, type="invalid_request_error", param=param)


def _bad_image(message: str, param: str) -> ApiError:
    return ApiError(400, message, type="invalid_image", param=param)


# -- images -------------------------------------------------------------------------------------
def decode_image(data: bytes, *, max_image_bytes: int, max_pixels: int, param: str = "image") -> Image.Image:
    """Bytes of an uploaded image -> RGB image; never decodes more than ``max_pixels``.

    Raises:
        ApiError: 413 over ``max_image_bytes``; 400 empty, not an image, corrupt, or a
            decompression bomb (more pixels than ``max_pixels``).
    """
    if len(data) > max_image_bytes:
        raise ApiError(
            413, f"{param} is {len(data)} bytes; the limit is {max_image_bytes}", type="request_too_large", param=param
        )
    if not data:
        raise _bad_image(f"{param} is empty", param)
    try:
        # Pillow checks the declared size against Image.MAX_IMAGE_PIXELS when it opens a file: a
        # warning above it, DecompressionBombError above twice it (Pillow docs, "Image.open").
        # The warning is an error here; our own check below also holds when another thread's
        # warnings.catch_warnings (not thread-safe) changed the filters meanwhile.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:
                    raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels")
                img.load()
                return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bad_image(f"{param} is a decompression bomb ({exc}); the limit is {max_pixels} pixels", param) from None
    except UnidentifiedImageError:
        raise _bad_image(f"{param} is not an image Pillow can read", param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _bad_image(f"{param} is a corrupt image ({exc})", param) from None


def _b64decode(text: str, *, max_image_bytes: int, param: str) -> bytes:
    if len(text) // 4 * 3 > max_image_bytes + 3:  # refuse before decoding a huge string
        raise ApiError(
            413,
            f"{param} is over the image size limit of {max_image_bytes} bytes",
            type="request_too_large",
            param=param,
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image(f"{param} is not valid base64", param) from None


def _image_bytes_from_text(text: str, *, max_image_bytes: int, param: str) -> bytes:
    """Base64 or a ``data:`` URI (RFC 2397: ``data:[<mediatype>][;base64],<data>``) -> bytes."""
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep:
            raise _bad_image(f"{param} is a data: URI without ',' before its data", param)
        if header.endswith(";base64"):
            return _b64decode(payload, max_image_bytes=max_image_bytes, param=param)
        return urllib.parse.unquote_to_bytes(payload)
    return _b64decode(text, max_image_bytes=max_image_bytes, param=param)


# -- body size limit and request metrics (pure ASGI, so that nothing reads past the limit) -----------
class _Limits:
    def __init__(self, app, *, max_body_bytes: int, metrics: _Metrics):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                error = self._too_large(int(declared))
                self.metrics.errors.labels(endpoint, error.type).inc()
                await _error_response(error)(scope, receive, send_status)
                return
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise self._too_large(received)
                return message

            await self.app(scope, limited_receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _too_large(self, size: int) -> ApiError:
        return ApiError(
            413,
            f"the request body is over the limit of {self.max_body_bytes} bytes (got {size})",
            type="request_too_large",
        )


class _Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "unified_vl_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "unified_vl_request_errors",
            "Error answers by endpoint and error type",
            ["endpoint", "type"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "unified_vl_request_latency_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "unified_vl_batch_size",
            "Queries per batch handed to the model",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.queue_depth = Gauge("unified_vl_queue_depth", "Queries waiting to be batched", registry=self.registry)


def _error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.type, "param": error.param}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# -- request parsing ----------------------------------------------------------------------------
async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        # A large body (a base64 image) parses in a thread, not on the event loop.
        body = json.loads(raw) if len(raw) < 65536 else await asyncio.to_thread(json.loads, raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON ({exc})", type="invalid_request_error") from None
    except RecursionError:  # [[[[...]]]]: Python's parser recurses once per level
        raise ApiError(400, "the body is JSON nested too deeply", type="invalid_request_error") from None
    if not isinstance(body, dict):
        raise _invalid(f"the body must be a JSON object, got {type(body).__name__}")
    return body


class Service:
    """What the endpoints share: the predictor, the batcher, the metrics, the key and the limits."""

    def __init__(self, predictor: Predictor, batcher: DynamicBatcher, metrics: _Metrics, *, api_key, limits: Limits):
        self.predictor, self.batcher, self.metrics = predictor, batcher, metrics
        self.api_key, self.limits = api_key, limits
        self.schema = RequestSchema(limits)

    def check_key(self, request: Request) -> None:
        """Raises 401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        headers = {"WWW-Authenticate": "Bearer"}  # RFC 6750 §3
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "missing API key: send 'Authorization: Bearer <key>'", type="authentication_error", headers=headers
            )
        if not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):  # constant time
            raise ApiError(401, "incorrect API key", type="authentication_error", headers=headers)

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's (validated) ``model`` field names: None for the base (its name, or no field).

        Raises:
            ApiError: 404 for a name this server does not serve (the message lists those it does).
        """
        if model is None or model == self.predictor.name:
            return None
        if model in self.predictor.adapter_names:
            return model
        served = ", ".join([self.predictor.name, *self.predictor.adapter_names])
        raise ApiError(
            404,
            f"model {model!r:.60} does not exist; this server serves: {served}",
            type="not_found_error",
            param="model",
        )

    def make_query(
        self, task: str, image: bytes | str | list[tuple[str, str]], inputs: dict, options: dict, param: str = "image"
    ) -> Any:
        """Decodes the image (a list of ``(data, param)``: several, in order) and validates the request
        into a `Query`; runs in a worker thread."""
        limits = self.limits

        def decode(data: bytes | str, param: str) -> Image.Image:
            if isinstance(data, str):
                data = _image_bytes_from_text(data, max_image_bytes=limits.max_image_bytes, param=param)
            return decode_image(
                data, max_image_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, param=param
            )

        if isinstance(image, list):
            decoded = [decode(data, where) for data, where in image]
        else:
            decoded = decode(image, param)
        try:
            return self.predictor.query(task, decoded, inputs, **options)
        except InputError as exc:
            raise _invalid(str(exc), exc.param) from None
        except ImageLoadError as exc:
            raise _bad_image(str(exc), param) from None

    async def run_query(self, query) -> Any:
        """The query's result from its dynamic batch."""
        try:
            return await self.batcher.submit(query)
        except QueueFullError as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", headers={"Retry-After": "1"}) from None
        except InputError as exc:
            raise _invalid(str(exc), exc.param) from None
        except Exception as exc:
            raise ApiError(500, f"the model failed: {type(exc).__name__}: {exc}", type="server_error") from None

    def answer_error(self, request: Request, error: ApiError) -> JSONResponse:
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        self.metrics.errors.labels(endpoint, error.type).inc()
        return _error_response(error)


def _service(request: Request) -> Service:
    return request.app.state.service


# -- endpoints ------------------------------------------------------------------------------------
router = APIRouter()


@router.get("/health")
async def health(request: Request):
    service = _service(request)
    return {
        "status": "ok",
        "model": service.predictor.name,
        "queue_depth": service.batcher.queue_depth,
        "max_batch": service.batcher.max_batch,
    }


@router.get("/metrics")
async def prometheus_metrics(request: Request):
    service = _service(request)
    service.metrics.queue_depth.set(service.batcher.queue_depth)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    service = _service(request)
    service.check_key(request)
    predictor = service.predictor
    tasks = {name: input_fields(name) for name in known_tasks()}
    card = {"id": predictor.name, "object": "model", "created": 0, "owned_by": "unified-vl", "tasks": tasks}
    cards = [card]
    for name in predictor.adapter_names:  # vLLM's LoRA cards: root = the adapter's folder, parent = the base
        adapter = predictor.adapters.adapters[name]
        cards.append(
            {**card, "id": name, "root": str(adapter.path), "parent": predictor.name, "method": adapter.method}
        )
    return {"object": "list", "data": cards}


@router.post("/v1/predict")
async def predict(request: Request):
    service = _service(request)
    service.check_key(request)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _multipart_body(request, service.schema)
    else:
        body = await _json_body(request)
    try:
        parsed = service.schema.predict(body, form=isinstance(body, _Form))
    except SchemaError as exc:
        raise _invalid(exc.message, exc.param) from None
    # The image is decoded, and the query's text tokenized, in a thread of this request: whatever
    # fails on this request's input fails here, before it joins a batch.
    options = {**parsed.options, "adapter": service.adapter_of(parsed.model)}
    query = await asyncio.to_thread(service.make_query, parsed.task, parsed.image, parsed.inputs, options)
    result = await service.run_query(query)
    return {"task": parsed.task, "model": options["adapter"] or service.predictor.name, "prediction": result.to_dict()}


class _Form(dict):
    """A multipart form's fields (list fields as lists, the image file as bytes): text, converted by the schema."""


async def _multipart_body(request: Request, schema: RequestSchema) -> _Form:
    """The form's fields; a list field repeats (``-F labels=cat -F labels=dog``) or is one JSON array."""
    form = await request.form(max_files=1, max_fields=64)
    body = _Form()
    try:
        task = form.get("task")
        lists = schema.list_fields(task if isinstance(task, str) else None)
        for name in form:
            values = form.getlist(name)
            if name == "image" and len(values) == 1:
                part = values[0]
                body[name] = await part.read() if isinstance(part, UploadFile) else part  # a file, or base64 text
                continue
            if any(isinstance(v, UploadFile) for v in values):
                raise _invalid(f"{name!r} must be a text field, not a file", name)
            if name in lists:
                body[name] = _form_list(name, values, text_items=lists[name])
            elif len(values) > 1:
                raise _invalid(f"{name!r} is given {len(values)} times; it takes one value", name)
            else:
                body[name] = values[0]
    finally:
        await form.close()
    return body


def _form_list(name: str, values: list[str], *, text_items: bool) -> Any:
    """A list field of a form: one JSON array, or repeated fields (each item JSON text unless items are text)."""

    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise _invalid(f"{name!r} is neither repeated fields nor a JSON array ({exc})", name) from None

    if len(values) == 1 and values[0].lstrip().startswith("["):
        return parse(values[0])
    return list(values) if text_items else [parse(v) if v.lstrip().startswith(("[", "{")) else v for v in values]


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    service = _service(request)
    service.check_key(request)
    try:
        chat = service.schema.chat(await _json_body(request))
    except SchemaError as exc:
        raise _invalid(exc.message, exc.param) from None
    prompt, images = _chat_input(chat)
    max_new_tokens = chat.max_completion_tokens or chat.max_tokens
    # No score: a chat completion has no field for it, and scoring is one more forward pass.
    options: dict[str, Any] = {"with_score": False}
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    options["adapter"] = service.adapter_of(chat.model)
    # One image: as before (in front of the prompt); several: each at its placeholder.
    image, param = (images[0][0], images[0][1]) if len(images) == 1 else (images, "messages")
    query = await asyncio.to_thread(service.make_query, GENERATE, image, {"prompt": prompt}, options, param)
    result = await service.run_query(query)
    completion = _Completion(service.predictor, query, result.text, num_images=len(images))
    if not chat.stream:
        return completion.body()
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return StreamingResponse(
        completion.events(include_usage=include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class _Completion:
    """One chat completion's answer, as a JSON body or as OpenAI's stream of Server-Sent Events."""

    def __init__(self, predictor: Predictor, query: Any, text: str, *, num_images: int = 1):
        self.model, self.text = query.adapter or predictor.name, text
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        max_new_tokens = query.generation.get("max_new_tokens", predictor.model.config.max_target_length)
        tokenizer = predictor.processor.tokenizer
        completion_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        # What the encoder read: the prompt's tokens after truncation (an interleaved prompt's
        # placeholders each widened into its image's vectors; one image goes in front, unplaced).
        placeholders = num_images if num_images > 1 else 0
        prompt_tokens = query.prompt_tokens - placeholders + num_images * predictor.model.visual.num_tokens
        self.usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self.finish_reason = "length" if completion_tokens >= max_new_tokens else "stop"

    def body(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": self.text}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}],
            "usage": self.usage,
        }

    def _chunk(self, choices: list, **extra) -> str:
        payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}
        payload.update(choices=choices, **extra)
        return f"data: {json.dumps(payload)}\n\n"  # one SSE event: a data line, then a blank line

    async def events(self, *, include_usage: bool):
        # OpenAI's stream: the role first, then the content, then the finish reason, then (with
        # stream_options.include_usage) a chunk of usage with no choices, then [DONE].
        def choice(delta: dict, finish: str | None) -> list:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        yield self._chunk(choice({"role": "assistant", "content": ""}, None))
        if self.text:
            yield self._chunk(choice({"content": self.text}, None))
        yield self._chunk(choice({}, self.finish_reason))
        if include_usage:
            yield self._chunk([], usage=self.usage)
        yield "data: [DONE]\n\n"


# -- the app --------------------------------------------------------------------------------------
def create_app(
    predictor: Predictor,
    *,
    max_batch: int = 16,
    max_wait_ms: float = 10.0,
    api_key: str | None = None,
    max_queue: int = 256,
    limits: Limits | None = None,
    **limit_overrides: int,
) -> FastAPI:
    """The FastAPI app serving ``predictor``.

    Args:
        predictor: the model.
        max_batch: the most queries run in one forward pass.
        max_wait_ms: how long a query waits for others to share its batch.
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>``.
        max_queue: queries waiting beyond this are refused with 429.
        limits: what one request may cost (`Limits`: image bytes and pixels, body bytes, text
            length, labels, candidates, tokens, beams, messages); None: the defaults.
        **limit_overrides: single `Limits` fields over ``limits`` (``max_image_bytes=65536``).

    Returns:
        The app; its lifespan starts and stops the batcher (``TestClient`` and uvicorn run it).
        Its ``/openapi.json`` describes every request and response body (`RequestSchema.openapi`).
    """
    limits = dataclasses.replace(limits or Limits(), **limit_overrides)
    metrics = _Metrics()
    batcher = DynamicBatcher(
        predictor.run,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        on_batch=metrics.batch_size.observe,
        on_queue=metrics.queue_depth.set,
    )
    service = Service(predictor, batcher, metrics, api_key=api_key, limits=limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="unified-vl", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.predictor, app.state.batcher, app.state.metrics = predictor, batcher, metrics
    _add_error_handlers(app, service)
    app.include_router(router)
    # Ahead of the routes, so the limit holds before anything reads the body.
    app.add_middleware(_Limits, max_body_bytes=limits.max_body_bytes, metrics=metrics)
    default_openapi = app.openapi

    def openapi() -> dict:
        # FastAPI's document (paths, info) with the bodies this server validates by hand (JSON or a form).
        if app.openapi_schema is None:
            app.openapi_schema = service.schema.openapi(default_openapi())
        return app.openapi_schema

    app.openapi = openapi
    return app


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    """Every error is OpenAI's ``{"error": {"message", "type", "param"}}`` with its status."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return service.answer_error(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        # Keep the exception's headers: a 405 must list the allowed methods in Allow (RFC 9110 §15.5.6).
        error = ApiError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers)
        return service.answer_error(request, error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return service.answer_error(request, _invalid(str(exc.errors())[:500]))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        error = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return service.answer_error(request, error)


def _chat_input(chat: Any) -> tuple[str, list[tuple[str, str]]]:
    """The instruction and the images (``(data: URI text, param path)``, in order) of a validated chat request.

    The last user message's text parts, joined, are the instruction; the image is its image part,
    or the latest one of an earlier user message. Several images in the last user message make an
    interleaved prompt: ``<image>`` where each was.
    """
    last_user = None
    image = None
    for i, message in enumerate(chat.messages):
        if message.role != "user":
            continue
        if message.content is None or isinstance(message.content, str):
            last_user = (i, [message.content or ""], [])
            continue
        parts: list[str | None] = []
        images: list[tuple[str, str]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                if IMAGE_TOKEN in part.text:
                    where = f"messages[{i}].content[{j}].text"
                    raise _invalid(
                        f"{where} holds {IMAGE_TOKEN!r}, the image placeholder; send each image as an "
                        "image_url part where it goes",
                        where,
                    )
                parts.append(part.text)
            else:
                parts.append(None)
                images.append((part.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        image = images[-1] if images else image
        last_user = (i, parts, images)
    if last_user is None:
        raise _invalid("messages holds no user message", "messages")
    index, parts, images = last_user
    texts = [p.strip() for p in parts if p is not None and p.strip()]
    if not texts:
        raise _invalid(f"messages[{index}] has no text: the text is the instruction", f"messages[{index}].content")
    if len(images) > 1:  # interleaved: each image where its part was
        return " ".join(IMAGE_TOKEN if p is None else p.strip() for p in parts if p is None or p.strip()), images
    if image is None:
        raise _invalid(
            "no image: add a content part {'type': 'image_url', 'image_url': {'url': 'data:...'}}", "messages"
        )
    return " ".join(texts), [image]
