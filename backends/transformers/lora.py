"""LoRA adapters (PEFT folders) on a loaded causal LM, applied row by row within a batch.

An adapter is read at its first use, on the compute thread between batches: its
adapter_config.json names the layers it adapts, adapter_model.safetensors holds their low-rank
matrices (pickled adapter_model.bin files are never read). peft builds the matrices against the
loaded model, which checks that they fit it (an adapter for another base names layers this model
lacks, or has other shapes), and they are then taken out of peft's wrappers and the model's own
layers put back: the model stays exactly as loaded, so a request without adapters computes as if
none had ever been loaded, and the base's weights are never copied.

While a batch holding rows with adapters computes, a forward hook on each adapted layer adds to
each such row's output the sum of its adapters' updates, `scale * scaling * B(A(x))` each
(`scaling` is the adapter's lora_alpha / r as trained; `scale` the model YAML's): rows of several
adapter sets and rows of the base model share one batch, as llama.cpp's decodes share a step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from backends.runtime import BackendError, adapter_stamp, invalid, missing_adapter
from protos.hearth.backend.v1 import backend_pb2 as pb
from protos.hearth.backend.v1.contract import Reason

log = logging.getLogger("hearth.backend.transformers")

#: A set of LoRA adapters, in order: (absolute path, scale) each; empty: the base model.
Adapters = tuple[tuple[str, float], ...]

_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
#: What a LoRA's config may ask for that changes the model beyond adding low-rank updates to
#: linear layers: refused, with what it would do.
_REFUSED = {
    "use_dora": "DoRA (a LoRA variant with magnitude vectors)",
    "modules_to_save": "whole copies of modules (modules_to_save)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "layer_replication": "replicated layers (layer_replication)",
    "target_parameters": "updates of bare parameters (target_parameters)",
}


def request_adapters(request: pb.GenerateRequest) -> Adapters:
    """The request's LoRA adapters, each checked to be a PEFT folder with safetensors weights
    (the rest is checked when it is loaded)."""
    for adapter in request.adapters:
        path = adapter.path
        name = os.path.basename(path)
        if not os.path.exists(path):
            raise missing_adapter(path)
        if not os.path.isdir(path):
            raise _refused(
                name,
                "is a file (a GGUF LoRA?): a transformers model takes PEFT adapter folders "
                f"({_CONFIG} and {_WEIGHTS})",
            )
        if not os.path.isfile(os.path.join(path, _CONFIG)):
            raise _refused(name, f"has no {_CONFIG}")
        if not os.path.isfile(os.path.join(path, _WEIGHTS)):
            raise _refused(
                name, f"has no {_WEIGHTS} (pickled adapter_model.bin files are not loaded)"
            )
    if request.adapters:
        _import_peft()  # here, on the caller's thread, not on the compute thread (seconds)
    return tuple((a.path, float(a.scale)) for a in request.adapters)


#: A row group's part of a layer's work: its rows (an index tensor; None: all of them) and the
#: updates to add to them, (lora_A, lora_B, scaling * scale) each.
_Part = tuple[Any, list[tuple[Any, Any, float]]]


@dataclass(frozen=True)
class _Update:
    """One adapted layer of one adapter: the layer's output gains `up(down(x)) * scaling`."""

    layer: Any  # the model's own module (nn.Linear, or transformers' Conv1D)
    down: Any  # lora_A
    up: Any  # lora_B
    scaling: float


class LoraAdapters:
    """The adapters loaded onto one model, by path, and their application to a batch."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._loaded: dict[str, list[_Update]] = {}
        #: The weights file each was read from (a file replaced in place is read again).
        self._stamps: dict[str, tuple[int, int, int]] = {}

    def load(self, adapters: Adapters) -> BackendError | None:
        """Load those of `adapters` not loaded yet (on the compute thread, between batches);
        the error for the request if one cannot be applied to this model."""
        for path, _ in adapters:
            try:
                stamp = adapter_stamp(path)
            except BackendError as exc:
                return exc
            if self._stamps.get(path) == stamp:
                continue  # loaded, and its file not replaced since
            try:
                self._loaded[path] = self._read(path)
                self._stamps[path] = stamp
            except BackendError as exc:
                log.warning("LoRA adapter %s refused: %s", path, exc.message)
                return exc
            log.info("loaded LoRA adapter %s (%d layers)", path, len(self._loaded[path]))
        return None

    @contextlib.contextmanager
    def applied(self, rows: list[Adapters]) -> Iterator[None]:
        """Within the block, each row of the batch computes with its adapters (all loaded)."""
        import torch

        groups: dict[Adapters, list[int]] = {}
        for row, adapters in enumerate(rows):
            # Scale 0 adds nothing: such a row is the base model's, exactly.
            effective = tuple((path, scale) for path, scale in adapters if scale != 0)
            if effective:
                groups.setdefault(effective, []).append(row)
        # Per adapted layer: each row group's rows (None: all of them) and updates.
        plans: dict[int, tuple[Any, dict[Adapters, _Part]]] = {}
        for adapters, members in groups.items():
            index = None
            if len(members) < len(rows):
                index = torch.tensor(members, device=self.model.device)
            for path, scale in adapters:
                for update in self._loaded[path]:
                    _, parts = plans.setdefault(id(update.layer), (update.layer, {}))
                    part = parts.setdefault(adapters, (index, []))
                    part[1].append((update.down, update.up, update.scaling * scale))
        handles = [
            layer.register_forward_hook(_adder(list(parts.values()), len(rows)), with_kwargs=True)
            for layer, parts in plans.values()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # Reading an adapter ---------------------------------------------------------------------

    def _read(self, path: str) -> list[_Update]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        name = os.path.basename(path)
        config = _config(path, name)
        try:
            weights = load_file(os.path.join(path, _WEIGHTS))
        except (OSError, SafetensorError) as exc:
            raise _refused(name, f"has an unreadable {_WEIGHTS}: {exc}") from None
        key = f"hearth_{len(self._loaded)}"  # peft's name for it while it is built
        try:
            return self._build(config, weights, key, name)
        finally:
            self._restore()

    def _build(self, config: Any, weights: dict[str, Any], key: str, name: str) -> list[_Update]:
        from peft import inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.model
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                inject_adapter_in_model(config, model, adapter_name=key)
                result: Any = set_peft_model_state_dict(model, weights, adapter_name=key)
            except (ValueError, RuntimeError, KeyError, TypeError) as exc:
                raise _refused(
                    name,
                    f"does not fit this model (was it made for another one?): {_reason(exc, key)}",
                ) from None
        for warning in caught:
            log.info("peft, loading %s: %s", name, warning.message)
        unexpected = [k.replace(f".{key}.", ".") for k in result.unexpected_keys]
        if unexpected:
            raise _refused(name, f"does not fit this model, which has no layer for {unexpected[0]}")
        missing = [k.replace(f".{key}.", ".") for k in result.missing_keys if f".{key}." in k]
        if missing:
            raise _refused(name, f"is incomplete: its file has no weights for {missing[0]}")
        updates = []
        for module_name, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer) or not any(
                key in getattr(module, kind, {}) for kind in module.adapter_layer_names
            ):
                continue
            if not isinstance(module, LoraLinear) or key in module.lora_variant:
                raise _refused(
                    name,
                    f"adapts {module_name}, a {type(module.get_base_layer()).__name__} layer, "
                    "or in a LoRA variant: Hearth applies plain LoRA on linear layers only",
                )
            updates.append(
                _Update(
                    layer=module.get_base_layer(),
                    down=module.lora_A[key],
                    up=module.lora_B[key],
                    scaling=float(module.scaling[key]),
                )
            )
        if not updates:
            raise _refused(name, "adapts no layer of this model")
        return updates

    def _restore(self) -> None:
        """Put the model's own layers back where peft wrapped them, and drop peft's records."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        model = self.model
        wrapped = [
            (name, module)
            for name, module in model.named_modules()
            if isinstance(module, BaseTunerLayer)
        ]
        for name, module in wrapped:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
        vars(model).pop("peft_config", None)


def _adder(parts: list[_Part], batch: int) -> Any:
    """A forward hook adding each row group's updates to its rows of a layer's output."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else next(iter(kwargs.values()))
        for index, updates in parts:
            rows = _rows(index, x.shape[0], batch)
            inputs = x if rows is None else x.index_select(0, rows)
            delta = None
            for down, up, factor in updates:
                term = up(down(inputs.to(down.weight.dtype))) * factor
                delta = term if delta is None else delta + term
            assert delta is not None
            delta = delta.to(output.dtype)
            output = output + delta if rows is None else output.index_add(0, rows, delta)
        return output

    return hook


def _rows(index: Any, leading: int, batch: int) -> Any:
    """Where a row group's rows lie along a layer input's first dimension: the batch's rows,
    or their tokens where a model flattened (batch, tokens) into one dimension."""
    if index is None or leading == batch:
        return index
    if leading % batch:
        raise RuntimeError(
            f"a LoRA layer's input has {leading} rows for a batch of {batch}: its adapters "
            "cannot be applied row by row"
        )
    import torch

    tokens = leading // batch
    return (index[:, None] * tokens + torch.arange(tokens, device=index.device)).flatten()


def _config(path: str, name: str) -> Any:
    """The adapter's LoraConfig, refused if it is not a plain LoRA."""
    from peft import LoraConfig

    try:
        with open(os.path.join(path, _CONFIG), encoding="utf-8") as file:
            data = json.load(file)
    except (OSError, ValueError) as exc:
        raise _refused(name, f"has an unreadable {_CONFIG}: {exc}") from None
    if not isinstance(data, dict):
        raise _refused(name, f"has a {_CONFIG} that is not a JSON object")
    kind = data.get("peft_type")
    if kind != "LORA":
        raise _refused(name, f"is not a LoRA: its {_CONFIG} says peft_type: {kind}")
    for field, what in _REFUSED.items():
        if data.get(field):
            raise _refused(name, f"asks for {what}, which Hearth does not apply")
    if data.get("bias", "none") != "none":
        # Trained biases are saved as the base model's own: loading them would change it.
        raise _refused(name, f"trains the model's biases (bias: {data['bias']})")
    # The adapter's matrices are read from its file: an initialisation that reworks the base's
    # weights (PiSSA, OLoRA, ...) would change the model itself.
    data["init_lora_weights"] = True
    data["inference_mode"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig.from_peft_type(**data)
    except (TypeError, ValueError) as exc:
        raise _refused(name, f"has a {_CONFIG} peft cannot read: {exc}") from None


def _reason(exc: BaseException, key: str) -> str:
    """The first line of what peft or torch said, without our name for the adapter."""
    text = str(exc).replace(f".{key}.", ".")
    mismatch = re.search(
        r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
        r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
        text,
    )
    if mismatch:
        where, theirs, ours = mismatch.groups()
        return f"{where} is {theirs} in the adapter and {ours} in this model"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def _refused(name: str, problem: str) -> BackendError:
    return invalid(
        Reason.ADAPTER_INVALID,
        f"the LoRA adapter {name} {problem}",
        param="model",
    )


def _import_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise BackendError(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.UNSUPPORTED,
            "LoRA adapters on a transformers model need peft: pip install 'hearth[transformers]'",
        ) from None
