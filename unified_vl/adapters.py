"""Adapters: a trained method's own weights as a small folder, and many of them served from one base.

    ADAPTER/adapter_config.json        {"format": 1, "method": "lora", "options": {...}, "parameters": 32768,
                                        "base": {"name": "/runs/main/model", "fingerprint": "3f2a...",
                                                 "architecture": {...}}}
    ADAPTER/adapter_model.safetensors  the method's weights, named as in a model the method is attached to

A method that saves adapters (``Method.saves_adapter``) trains only the parameters its ``attach``
adds and leaves trainable; those are its weights (`method_weights`). Loading one is attaching the
method to the base and copying them in (`apply_adapter`). The base is named by its folder and
identified by its architecture and a fingerprint of its weights (`base_identity`): an adapter
trained on another base is refused with both named, before anything is loaded.

`AdapterSet` serves several adapters from one base model. Each adapter of a method without
``add_adapter`` (the prompt methods) gets its own *view*: a model object whose base parameters are
the base model's own tensors (nothing is copied), with the method attached; its rows run as a group.
Adapters of a method with ``add_adapter`` (LoRA) all live in one shared view, the *host*, where the
rows of one batch each use their own adapter (``model.rows``; ``peft``'s ``adapter_names``), and
base rows run there too as ``"__base__"``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unified_vl.checkpoint import CheckpointError, write_folder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = 1
BASE_ROWS = "__base__"  # the name of a row without adapter (peft's convention for mixed batches)


class AdapterError(CheckpointError):
    """An adapter folder that cannot be read, or that does not fit the model; the message names both."""


# -- the base model's identity -----------------------------------------------------------------
def weights_fingerprint(folder: str | os.PathLike) -> str:
    """SHA-256 over a model folder's weights: every tensor's name, dtype, shape and bytes, names sorted.

    Read tensor by tensor from the folder's ``*.safetensors`` files (one file or shards), so the
    fingerprint depends on the weights, not on how they were split into files, and costs one pass
    over them (about a second per GB).

    Raises:
        AdapterError: the folder holds no safetensors weights.
    """
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{str(folder)!r} holds no *.safetensors weights to identify the base model by")
    per_tensor = {}  # name -> digest of (name, dtype, shape, bytes); combined in name order below
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name).contiguous()
                digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
                per_tensor[name] = digest.hexdigest()
    return hashlib.sha256("".join(per_tensor[name] for name in sorted(per_tensor)).encode()).hexdigest()


def architecture(model_config) -> dict:
    """The config fields two models must share for one's adapter to fit the other (the trainer's resume check)."""
    from unified_vl.engine.trainer import architecture as run_architecture

    return json.loads(json.dumps(run_architecture(model_config)))  # plain JSON types, as read back from a file


def base_identity(folder: str | os.PathLike, model_config) -> dict:
    """``{"name", "fingerprint", "architecture"}`` of the base model folder ``folder``."""
    return {
        "name": str(Path(folder).resolve()),
        "fingerprint": weights_fingerprint(folder),
        "architecture": architecture(model_config),
    }


def check_base(adapter: Adapter, identity: Mapping[str, Any]) -> None:
    """Raises `AdapterError` unless ``adapter`` was trained on the base ``identity`` describes.

    The message names both bases: their folders, fingerprints and any architecture field that differs.
    """
    saved = adapter.base
    if saved.get("fingerprint") == identity["fingerprint"] and saved.get("architecture") == identity["architecture"]:
        return
    arch_saved, arch_now = saved.get("architecture") or {}, identity["architecture"]
    diffs = [f"{k}: {arch_saved.get(k)!r} vs {arch_now.get(k)!r}" for k in arch_now if arch_saved.get(k) != arch_now[k]]
    raise AdapterError(
        f"adapter {str(adapter.path)!r} was trained on another base model: it was trained on "
        f"{saved.get('name')!r} (weights {str(saved.get('fingerprint'))[:12]}), this base is "
        f"{identity['name']!r} (weights {identity['fingerprint'][:12]})"
        + (f"; architecture differs in {'; '.join(diffs)}" if diffs else "")
        + ". Load it onto the model it was trained from."
    )


# -- the method's weights -----------------------------------------------------------------------
def method_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters a saving method left trainable when it attached: its own weights, by name."""
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


def load_method_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, where: str) -> None:
    """Copies ``state`` into the method's parameters of ``model`` (attached already); all of them, exactly.

    Raises:
        AdapterError: a missing, unexpected or wrongly shaped tensor (named, with ``where``).
    """
    own = method_weights(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise AdapterError(
            f"{where} does not fit the method's parameters: missing {missing[:6]}, unexpected {unexpected[:6]}, "
            f"shapes {shapes[:6]}"
        )
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])


# -- the folder ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapter:
    """An adapter folder, read.

    Attributes:
        path: the folder.
        method: the method's name (``unified_vl.prompting``).
        options: the method's options it was trained with.
        base: ``{"name", "fingerprint", "architecture"}`` of the base it was trained on.
        state: the method's weights.
    """

    path: Path
    method: str
    options: dict[str, Any]
    base: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def save_adapter(
    out_dir: str | os.PathLike,
    *,
    method: str,
    options: Mapping[str, Any],
    base: Mapping[str, Any],
    state: Mapping[str, torch.Tensor],
) -> Path:
    """Writes an adapter folder atomically (a temporary sibling renamed into place); returns it.

    The weights are saved in float32 whatever the training precision, as model folders are.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    config = {
        "format": FORMAT,
        "method": method,
        "options": dict(options),
        "parameters": sum(t.numel() for t in tensors.values()),
        "base": dict(base),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "method": method})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    return write_folder(out, write)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Reads an adapter folder written by `save_adapter`.

    Raises:
        AdapterError: not an adapter folder, an unknown format or method, or missing weights.
    """
    from safetensors.torch import load_file

    from unified_vl.prompting import MethodError, get_method

    folder = Path(path)
    config_file = folder / ADAPTER_CONFIG
    if not config_file.is_file():
        what = "a model folder" if (folder / "config.json").is_file() else "not an adapter folder"
        raise AdapterError(f"{str(folder)!r} is {what}: it has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{str(config_file)!r} is not valid JSON ({exc})") from None
    if config.get("format") != FORMAT or not isinstance(config.get("base"), dict):
        raise AdapterError(f"{str(config_file)!r} is not a format-{FORMAT} adapter config")
    try:
        method = get_method(config.get("method"))
        options = method.resolve_options(config.get("options"))
    except MethodError as exc:
        raise AdapterError(f"adapter {str(folder)!r}: {exc}") from None
    if not method.saves_adapter:
        raise AdapterError(f"adapter {str(folder)!r} names method {method.name!r}, which saves no adapters")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"adapter {str(folder)!r} has no {ADAPTER_WEIGHTS}")
    state = load_file(str(folder / ADAPTER_WEIGHTS))
    return Adapter(folder, method.name, options, config["base"], state)


def apply_adapter(model: torch.nn.Module, adapter: Adapter) -> torch.nn.Module:
    """Attaches ``adapter``'s method to ``model`` and loads its weights, in place; returns ``model``."""
    from unified_vl.prompting import get_method

    get_method(adapter.method).attach(model, adapter.options)
    load_method_weights(model, adapter.state, where=f"adapter {str(adapter.path)!r}")
    return model


# -- serving many adapters from one base ---------------------------------------------------------
class AdapterSet:
    """A base model and named adapters; says which model runs which rows.

    Args:
        model: the base model (evaluation mode; its device and dtype are the views').
        base_path: its folder, which identifies it (`base_identity`).
    """

    def __init__(self, model, base_path: str | os.PathLike):
        self.base = model
        self.identity = base_identity(base_path, model.config)
        # The base's tensors by name: every view is built around these very tensors.
        self._tensors = dict(model.state_dict(keep_vars=True))
        self.adapters: dict[str, Adapter] = {}
        self._views: dict[str, torch.nn.Module] = {}
        self._host = None  # the view that holds the adapters whose rows mix in one batch

    def _view(self):
        from unified_vl.modeling import UnifiedVLForConditionalGeneration

        # Built on the meta device (no memory, no initialisation), then given the base's tensors.
        with torch.device("meta"):
            view = UnifiedVLForConditionalGeneration(copy.deepcopy(self.base.config))
        view.load_state_dict(self._tensors, assign=True, strict=True)
        return view.eval()

    def add(self, name: str, path: str | os.PathLike) -> Adapter:
        """Loads the adapter folder ``path`` under ``name``.

        Raises:
            AdapterError: a bad folder, an adapter of another base (both named), or a taken name.
            ValueError: an empty name or the reserved ``"__base__"``.
        """
        from unified_vl.prompting import get_method

        if not isinstance(name, str) or not name.strip() or name == BASE_ROWS:
            raise ValueError(f"an adapter name must be a non-empty string other than {BASE_ROWS!r}, got {name!r}")
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is loaded already (from {str(self.adapters[name].path)!r})")
        adapter = read_adapter(path)
        check_base(adapter, self.identity)
        method = get_method(adapter.method)
        if method.add_adapter is not None:
            if self._host is None:
                self._host = self._view()
            method.add_adapter(self._host, name, adapter.options, adapter.state)
            view = self._host
        else:
            view = apply_adapter(self._view(), adapter)
        # New parameters start on the CPU in float32; the base's tensors are where they belong already.
        view.to(device=self.base.device, dtype=self.base.dtype).eval()
        self.adapters[name] = adapter
        self._views[name] = view
        return adapter

    def plan(self, names: Sequence[str | None]) -> list[tuple[Any, list[int], list[str] | None]]:
        """Rows -> ``[(model, row indices, per-row adapter names or None)]``, one entry per model.

        ``names[i]`` is row i's adapter, None for the base. Rows of mixing adapters (and base rows,
        when such adapters are loaded) share the host with their names; the others run on their
        adapter's view, base rows on the base.

        Raises:
            KeyError: an unknown adapter name (the message lists the loaded ones).
        """
        groups: dict[int, tuple[Any, list[int], list[str]]] = {}
        for i, name in enumerate(names):
            if name is not None and name not in self._views:
                raise KeyError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
            model = self._views[name] if name is not None else self._host if self._host is not None else self.base
            entry = groups.setdefault(id(model), (model, [], []))
            entry[1].append(i)
            entry[2].append(name or BASE_ROWS)
        return [(model, rows, names if model is self._host else None) for model, rows, names in groups.values()]
