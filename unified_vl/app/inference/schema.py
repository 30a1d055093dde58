"""The server's request schema: one place that validates every field of ``/v1/predict`` and
``/v1/chat/completions``, JSON and multipart, and describes the bodies in ``/openapi.json``.

    schema = RequestSchema(Limits(max_labels=100))
    request = schema.predict(body, form=False)       # PredictRequest, or ApiError 422 naming the field
    chat = schema.chat(body)                         # ChatRequest, or ApiError 422
    schema.openapi(base)                             # the request and response bodies, added to FastAPI's document

The bodies are pydantic models built from the task registry (each task's input fields and their
storage types, ``tasks.FieldSpec.storage``) and the server's `Limits`: ``/v1/predict`` is a union of
one model per task, told apart by ``task`` (an OpenAPI ``oneOf`` with a ``discriminator``), so a
fuzzer reading the schema (schemathesis) generates each task's own fields. A JSON body is validated
strictly (a JSON integer where the schema says integer); a form's fields are text and are converted
by the same models in pydantic's lax mode (``"3"`` -> 3, ``"²"`` refused). Anything the schema
refuses is a 422 whose ``param`` is the path of the field (``messages[0].content[1].image_url.url``).

What only the image can tell (a region outside the image, a prompt the task cannot build) is checked
per request after the image is decoded, by :meth:`unified_vl.app.inference.predictor.Predictor.query`,
still before the request joins a batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    create_model,
)

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may cost; each field is a ``unified-vl serve`` option (``--max-image-pixels``, ...).

    The defaults are meant to be safe on a shared machine: an image of 4096 x 4096 pixels decodes to
    48 MB of RGB (a 9000 x 9000 one, under Pillow's own bomb limit of 89 million pixels, to 243 MB
    and seconds of decoding), and each label of rank classification is one more scored sequence.
    """

    max_image_bytes: int = field(default=10 * MiB, metadata={"help": "the largest image file in bytes"})
    max_body_bytes: int = field(default=16 * MiB, metadata={"help": "the largest request body in bytes"})
    max_image_pixels: int = field(
        default=4096 * 4096, metadata={"help": "the most pixels (width x height) an image may have"}
    )
    max_text_chars: int = field(
        default=4096, metadata={"help": "the longest text field (question, prompt, a label, ...) in characters"}
    )
    max_labels: int = field(default=100, metadata={"help": "the most labels of rank classification (labels)"})
    max_candidates: int = field(
        default=4096,
        metadata={"help": "the most candidate answers (candidates) or list items of a task field (VQAv2's list: 3129)"},
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "the highest max_new_tokens / max_tokens a request may ask"}
    )
    max_beams: int = field(default=8, metadata={"help": "the highest num_beams a request may ask"})
    max_messages: int = field(default=64, metadata={"help": "the most messages (and content parts) of a chat request"})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")


class SchemaError(ValueError):
    """A request the schema refuses: ``message`` names ``param``, the path of the offending field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message, self.param = message, param


# -- types -----------------------------------------------------------------------------------------
def _unicode(value: str) -> str:
    # JSON may carry a lone surrogate ("\ud800"); it is not Unicode text and no tokenizer takes it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode text ({exc.reason} at position {exc.start})") from None
    return value


def _text(limits: Limits) -> Any:
    return Annotated[str, StringConstraints(min_length=1, max_length=limits.max_text_chars), AfterValidator(_unicode)]


def _texts(limits: Limits, most: int) -> Any:
    return Annotated[list[_text(limits)], Field(min_length=1, max_length=most)]


def _storage_type(storage: Any, limits: Limits, name: str) -> Any:
    """A task field's storage type (``tasks.FieldSpec.storage``) as a pydantic type."""
    if isinstance(storage, list):
        return Annotated[list[_storage_type(storage[0], limits, name)], Field(max_length=limits.max_candidates)]
    if isinstance(storage, dict):
        fields = {key: (_storage_type(value, limits, f"{name}_{key}"), ...) for key, value in storage.items()}
        return create_model(f"{name}_item", __config__=ConfigDict(extra="forbid"), **fields)
    if storage == "box":  # [x1, y1, x2, y2] in pixels; inside the image is checked once it is decoded
        return Annotated[list[Annotated[float, Field(allow_inf_nan=False)]], Field(min_length=4, max_length=4)]
    if storage in ("int32", "int64"):
        return int
    if storage == "float64":
        return Annotated[float, Field(allow_inf_nan=False)]
    if storage == "bool":
        return bool
    return _text(limits)


# The image: base64 or a data: URI in JSON (RFC 2397), a file part (bytes) in a form.
# A 4 x 4 RGB PNG: the schema's example, so that a client or a fuzzer reading it has an image that decodes.
EXAMPLE_IMAGE = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAFElEQVR4nGM8ISfHAANMDEgANwcANHYBDK9qubUAAAAASUVORK5CYII="
ImageField = Annotated[
    str | bytes,
    WithJsonSchema(
        {
            "type": "string",
            "description": "the image file, base64 or a data: URI (RFC 2397)",
            "examples": [EXAMPLE_IMAGE],
        }
    ),
]


def _options(limits: Limits) -> dict[str, Any]:
    """The options of ``/v1/predict`` besides the task's own fields (every task has them)."""

    def bounded(low: int, high: int) -> Any:
        return (Annotated[int, Field(ge=low, le=high)] | None, None)

    return {
        "candidates": (_texts(limits, limits.max_candidates) | None, None),
        "labels": (_texts(limits, limits.max_labels) | None, None),
        "top_k": bounded(1, limits.max_labels),
        "num_beams": bounded(1, limits.max_beams),
        "max_new_tokens": bounded(1, limits.max_new_tokens),
        # A method that reads answers its own way (unified_vl.prompting; "cpt") and its options.
        "method": (_text(limits) | None, None),
        "method_options": (dict[str, Any] | None, None),
    }


OPTION_NAMES = ("candidates", "labels", "top_k", "num_beams", "max_new_tokens", "method", "method_options")


def _task_model(name: str, limits: Limits) -> type[BaseModel]:
    """The /v1/predict body of one task: ``task``, ``image``, the task's input fields, the options."""
    from unified_vl.app.inference.predictor import GENERATE, input_fields

    fields: dict[str, Any] = {"task": (Literal[name], ...), "image": (ImageField, ...)}
    fields["model"] = (_text(limits) | None, None)  # an adapter's name; the base by its name or when left out
    if name == GENERATE:
        fields["prompt"] = (_text(limits), ...)
    else:
        import tasks

        specs = tasks.get_task(name).fields
        for field_name in input_fields(name):
            spec = specs[field_name]
            kind = _storage_type(spec.storage, limits, f"{name}_{field_name}")
            fields[field_name] = (kind, ...) if spec.required else (kind | None, None)
    fields.update(_options(limits))
    model_name = "Predict_" + "".join(part.capitalize() for part in name.split("_"))
    return create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)


def _list_fields(name: str) -> dict[str, bool]:
    from unified_vl.app.inference.predictor import GENERATE, input_fields

    if name == GENERATE:
        return {}
    import tasks

    specs = tasks.get_task(name).fields
    out = {}
    for field_name in input_fields(name):
        storage = specs[field_name].storage
        if storage == "box":  # repeated numbers
            out[field_name] = True
        elif isinstance(storage, list):
            out[field_name] = storage[0] == "string"
    return out


# -- chat (OpenAI Chat Completions, https://platform.openai.com/docs/api-reference/chat/create) ------
def _chat_models(limits: Limits) -> type[BaseModel]:
    forbid = ConfigDict(extra="forbid")
    text = _text(limits)

    def data_uri(url: str) -> str:
        if not url.startswith("data:"):
            raise ValueError("must be a data: URI (data:image/png;base64,...); the server fetches nothing")
        return url

    class ImageURL(BaseModel):
        model_config = forbid
        url: Annotated[
            str, AfterValidator(data_uri), Field(json_schema_extra={"pattern": "^data:", "examples": [EXAMPLE_IMAGE]})
        ]
        detail: Literal["auto", "low", "high"] | None = None  # accepted; the model sees one size

    class TextPart(BaseModel):
        model_config = forbid
        type: Literal["text"]
        text: Annotated[str, StringConstraints(max_length=limits.max_text_chars), AfterValidator(_unicode)]

    class ImagePart(BaseModel):
        model_config = forbid
        type: Literal["image_url"]
        image_url: ImageURL

    Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]  # noqa: UP007

    class Message(BaseModel):
        model_config = forbid
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: (
            Annotated[str, StringConstraints(max_length=limits.max_text_chars), AfterValidator(_unicode)]
            | Annotated[list[Part], Field(max_length=limits.max_messages)]
            | None
        ) = None
        name: text | None = None

    class StreamOptions(BaseModel):
        model_config = forbid
        include_usage: bool | None = None

    tokens = Annotated[int, Field(ge=1, le=limits.max_new_tokens)] | None

    class ChatRequest(BaseModel):
        """A chat completion request; sampling options are accepted and have no effect (decoding is greedy)."""

        model_config = forbid
        model: text | None = None
        messages: Annotated[list[Message], Field(min_length=1, max_length=limits.max_messages)]
        max_tokens: tokens = None  # the older name of max_completion_tokens
        max_completion_tokens: tokens = None
        n: Literal[1] | None = None  # decoding is deterministic: every choice would be the same
        stream: bool | None = None
        stream_options: StreamOptions | None = None
        temperature: Annotated[float, Field(ge=0, le=2)] | None = None
        top_p: Annotated[float, Field(ge=0, le=1)] | None = None
        seed: int | None = None
        presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
        frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
        user: text | None = None

    return ChatRequest


# -- the schema ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PredictRequest:
    """A validated /v1/predict body: the task, the image (text or bytes), the task's fields, the options."""

    task: str
    image: str | bytes
    inputs: dict[str, Any]
    options: dict[str, Any]
    model: str | None = None


class RequestSchema:
    """The request bodies of one server (its limits are part of the schema)."""

    def __init__(self, limits: Limits):
        from unified_vl.app.inference.predictor import known_tasks

        self.limits = limits
        self.tasks = known_tasks()
        self.task_models = {name: _task_model(name, limits) for name in self.tasks}
        self._list_fields = {name: _list_fields(name) for name in self.tasks}
        union = Union[tuple(self.task_models.values())]  # noqa: UP007
        self.predict_adapter = TypeAdapter(Annotated[union, Field(discriminator="task")])
        self.chat_model = _chat_models(limits)

    # -- validation ------------------------------------------------------------------------------
    def list_fields(self, task: str | None) -> dict[str, bool]:
        """The fields of ``task``'s body that hold lists (a form repeats them), each with whether its
        items are text (else each item is JSON text, like a box ``[0, 0, 10, 10]``); every task's when unknown."""
        names = [task] if task in self.task_models else self.tasks
        out = {"candidates": True, "labels": True}
        for t in names:
            out.update(self._list_fields[t])
        return out

    def predict(self, body: Mapping[str, Any], *, form: bool) -> PredictRequest:
        """A /v1/predict body (a JSON object, or a form's fields with list fields as lists).

        Raises:
            SchemaError: the field that does not fit, by its path.
        """
        body = dict(body)
        if form and isinstance(body.get("method_options"), str):  # a form field holds the object as JSON text
            try:
                body["method_options"] = json.loads(body["method_options"])
            except json.JSONDecodeError:
                raise SchemaError("method_options must be a JSON object", "method_options") from None
        try:
            model = self.predict_adapter.validate_python(body, strict=not form)
        except ValidationError as exc:
            raise self._error(exc, body) from None
        values = model.model_dump()
        values = {k: v for k, v in values.items() if k not in ("task", "image", "model")}
        options = {k: values.pop(k) for k in OPTION_NAMES}
        options = {k: v for k, v in options.items() if v is not None or k in ("candidates", "labels")}
        inputs = {k: v for k, v in values.items() if v is not None}
        return PredictRequest(model.task, model.image, inputs, options, model.model)

    def chat(self, body: Mapping[str, Any]) -> BaseModel:
        """A /v1/chat/completions body as a ``ChatRequest``.

        Raises:
            SchemaError: the field that does not fit, by its path.
        """
        try:
            return self.chat_model.model_validate(dict(body), strict=True)
        except ValidationError as exc:
            raise self._error(exc, body) from None

    def _error(self, exc: ValidationError, body: Any) -> SchemaError:
        errors = exc.errors(include_url=False)
        # Of a union's alternatives, the deepest error is the one about the field that was meant.
        error = max(errors, key=lambda e: len(e["loc"]))
        kind, param = error["type"], field_path(error["loc"], body, error["type"])
        if kind in ("union_tag_not_found", "union_tag_invalid"):  # the field that tells the alternatives apart
            tag = str(error.get("ctx", {}).get("discriminator", "")).strip("'")
            param = f"{param}.{tag}" if param else tag
        if kind == "union_tag_not_found" and param == "task":
            return SchemaError(f"missing field 'task'; one of {', '.join(self.tasks)}", "task")
        if kind == "union_tag_invalid" and param == "task":
            task = body.get("task") if isinstance(body, Mapping) else None
            return SchemaError(f"unknown task {task!r:.60}; known tasks: {', '.join(self.tasks)}", "task")
        if kind == "missing":
            message = f"missing field {param!r}"
        elif kind == "extra_forbidden":
            allowed = self._allowed(body, param)
            message = f"unknown field {param!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        else:
            got = error.get("input")
            message = f"{param or 'the body'}: {error['msg'].removeprefix('Value error, ')}, got {_short(got)}"
        more = len(errors) - 1 if len({tuple(e["loc"][:1]) for e in errors}) > 1 else 0
        return SchemaError(message + (f" (and {more} more problem(s))" if more else ""), param or None)

    def _allowed(self, body: Any, param: str) -> list[str]:
        if "." in param or "[" in param or not isinstance(body, Mapping):
            return []
        model = self.task_models.get(body.get("task")) if "task" in body else self.chat_model
        return sorted(model.model_fields) if model is not None else []

    # -- OpenAPI ---------------------------------------------------------------------------------
    def openapi(self, document: dict) -> dict:
        """``document`` (FastAPI's OpenAPI) with the request and response bodies of every endpoint."""
        document = copy.deepcopy(document)
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        predict = self.predict_adapter.json_schema(ref_template="#/components/schemas/{model}")
        chat = self.chat_model.model_json_schema(ref_template="#/components/schemas/{model}")
        for part in (predict, chat):
            schemas.update(part.pop("$defs", {}))
        schemas["ChatRequest"] = chat
        schemas["Error"] = ERROR_SCHEMA
        form = _form_schema(self.task_models, schemas)
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        paths = document["paths"]
        errors = {
            str(code): {
                "description": what,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
            for code, what in ERROR_STATUSES.items()
        }
        paths["/v1/predict"]["post"].update(
            requestBody={
                "required": True,
                "content": {"application/json": {"schema": predict}, "multipart/form-data": {"schema": form}},
            },
            responses={"200": _json_response("the prediction", PREDICTION_SCHEMA), **errors},
            security=[{"bearer": []}],
        )
        paths["/v1/chat/completions"]["post"].update(
            requestBody={
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
            },
            responses={
                "200": {
                    "description": "the completion; with stream: true, Server-Sent Events",
                    "content": {
                        "application/json": {"schema": COMPLETION_SCHEMA},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                },
                **errors,
            },
            security=[{"bearer": []}],
        )
        paths["/v1/models"]["get"].update(
            responses={"200": _json_response("the model", {"type": "object"}), "401": errors["401"]},
            security=[{"bearer": []}],
        )
        paths["/health"]["get"]["responses"] = {"200": _json_response("the server is up", {"type": "object"})}
        paths["/metrics"]["get"]["responses"] = {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
        }
        return document


def field_path(loc: tuple, body: Any, kind: str) -> str:
    """A pydantic error location as the path of the field in ``body`` (``messages[0].content[1].text``).

    Union alternatives add their tags to the location (``'vqa'``, ``'list[...]'``); the body has no
    such key, so walking the body tells them apart from real keys and indices.
    """
    parts: list[str] = []
    node = body
    for i, item in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(item, int) and isinstance(node, list) and 0 <= item < len(node):
            parts.append(f"[{item}]")
            node = node[item]
        elif isinstance(item, str) and isinstance(node, Mapping) and item in node:
            parts.append(f".{item}" if parts else item)
            node = node[item]
        elif last and isinstance(item, str) and kind in ("missing", "extra_forbidden"):
            parts.append(f".{item}" if parts else item)
    return "".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_response(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _form_schema(task_models: dict[str, type[BaseModel]], schemas: dict) -> dict:
    """The multipart form: every task's fields side by side (a form cannot be a union), the image a file."""
    properties: dict[str, Any] = {}
    for model in task_models.values():
        for name, prop in model.model_json_schema(ref_template="#/components/schemas/{model}")["properties"].items():
            if name == "task":
                continue
            properties.setdefault(name, prop)
    # A form field is present with a value or absent: it cannot be null.
    properties = {name: _not_null(prop) for name, prop in properties.items()}
    properties["task"] = {"type": "string", "enum": list(task_models)}
    properties["image"] = {"type": "string", "format": "binary", "description": "the image file"}
    return {"type": "object", "properties": properties, "required": ["task", "image"]}


def _not_null(prop: dict) -> dict:
    arms = [arm for arm in prop.get("anyOf", []) if arm.get("type") != "null"]
    if not arms:
        return prop
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**rest, **arms[0]} if len(arms) == 1 else {**rest, "anyOf": arms}


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_STATUSES = {
    400: "the body is not JSON, or the image cannot be decoded",
    401: "a missing or wrong API key",
    404: "the model field names neither the served model nor one of its adapters",
    413: "the body or the image is over its size limit",
    422: "a field the schema refuses",
    429: "the request queue is full; retry later",
}
PREDICTION_SCHEMA = {
    "type": "object",
    "required": ["task", "model", "prediction"],
    "properties": {"task": {"type": "string"}, "model": {"type": "string"}, "prediction": {"type": "object"}},
}
COMPLETION_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "object": {"const": "chat.completion"},
        "choices": {"type": "array", "minItems": 1},
        "usage": {
            "type": "object",
            "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
            "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "completion_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0},
            },
        },
    },
}
