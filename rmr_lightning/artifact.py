"""The processor artifact: the hand-off from pretraining to natural fine-tuning.

``processor.pt`` is a plain dict that ``torch.load(weights_only=True)`` reads (format version 2)::

    state_dict  P's weights alone
    config      {"class_path": ..., "init_args": {...}} that rebuild P
    encoder, decoder   {"state_dict", "config"} of the linear f and g (for alignment and readout)
    abstract_spec      the abstract inputs (``AbstractSpec.to_dict()``): parameter names/scales, rollout bound
    digests     sha256 of each part that shapes the model: processor, encoder, decoder (weights),
                configs (the three rebuild configs), abstract_spec (canonical JSON)
    sha256      sha256 of the digests: the identity of the whole model (studies record it)
    metrics     what the pretraining measured, and whether it ran its planned steps (a report, not hashed)

Nothing in the file chooses code to run: classes are rebuilt only from an allow-list (the processors
registered in the entry-point group ``rmr_lightning.processors`` or defined in the ``processors``
package, and ``torch.nn.Linear`` for f and g) with plain JSON-like arguments. The hashes find corruption
and edits of any part (a file's author could recompute them: they are integrity, not authentication).
``load_processor_artifact`` rebuilds every part with strict key and shape checks and refuses a
corrupt or mismatched file with an error that names it and says what differs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import pkgutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import processors
from processors.base import Processor
from processors.registry import available_processors
from rmr_lightning.algorithms import AbstractSpec
from rmr_lightning.files import atomic_torch_save

FORMAT_VERSION = 2
#: Version-1 files are refused: their hash covered P's weights only, so their configs and abstract_spec
#: cannot be verified, none ships with the repo (results/ is ignored), and `make pretrain` rewrites one.
SUPPORTED_VERSIONS = (FORMAT_VERSION,)
LINEAR_CLASS_PATHS = ("torch.nn.Linear", "torch.nn.modules.linear.Linear")
PARTS = ("processor", "encoder", "decoder", "configs", "abstract_spec")
PART_NAMES = {
    "processor": "processor weights",
    "encoder": "encoder (f) weights",
    "decoder": "decoder (g) weights",
    "configs": "rebuild configs",
    "abstract_spec": "abstract_spec",
}
PLAIN_SCALARS = (int, float, str, bool, type(None))


class ArtifactError(RuntimeError):
    """A processor artifact that cannot be used as asked."""


def state_dict_sha256(state_dict: dict[str, Tensor]) -> str:
    """Content hash of a state dict, independent of how the file was serialised."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """One text per value (sorted keys, no spaces), so equal configs hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def json_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def part_digests(payload: dict[str, Any]) -> dict[str, str]:
    """sha256 of each part of an artifact that shapes the model (``PARTS``)."""
    configs = {
        "processor": payload["config"],
        "encoder": payload["encoder"]["config"],
        "decoder": payload["decoder"]["config"],
    }
    return {
        "processor": state_dict_sha256(payload["state_dict"]),
        "encoder": state_dict_sha256(payload["encoder"]["state_dict"]),
        "decoder": state_dict_sha256(payload["decoder"]["state_dict"]),
        "configs": json_sha256(configs),
        "abstract_spec": json_sha256(payload["abstract_spec"]),
    }


def content_sha256(digests: dict[str, str]) -> str:
    """The whole model's hash: of the part digests, so it changes when any part does."""
    return json_sha256({part: digests[part] for part in PARTS})


def class_path(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def linear_config(layer: nn.Linear) -> dict[str, Any]:
    return {
        "class_path": "torch.nn.Linear",
        "init_args": {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        },
    }


def _weights(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _metric(value: Any) -> float | int | str | bool | None:
    """Metrics stay plain: counts and flags as they are, other numbers as floats."""
    return value if isinstance(value, (str, bool, int, type(None))) else float(value)


def save_processor_artifact(
    path: str | Path,
    processor: Processor,
    encoder: nn.Linear,
    decoder: nn.Linear,
    abstract_spec: AbstractSpec | Mapping[str, Any],
    metrics: dict[str, Any] | None = None,
) -> str:
    """Write ``processor.pt`` atomically (temp file then rename); returns its content sha256.

    ``abstract_spec`` is stored as ``AbstractSpec.to_dict()``: plain JSON, as in every version-2 file."""
    path = Path(path)
    config = {"class_path": class_path(processor), "init_args": processor.init_args()}
    _check_plain(config["init_args"], Path(path), "processor init_args")  # a file we could not load is not written
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": _weights(processor),
        "config": config,
        "encoder": {"state_dict": _weights(encoder), "config": linear_config(encoder)},
        "decoder": {"state_dict": _weights(decoder), "config": linear_config(decoder)},
        "abstract_spec": json.loads(json.dumps(AbstractSpec.from_dict(abstract_spec).to_dict())),  # as read back
        "metrics": {k: _metric(v) for k, v in (metrics or {}).items()},
    }
    payload["digests"] = part_digests(payload)
    payload["sha256"] = content_sha256(payload["digests"])
    atomic_torch_save(payload, path)
    return payload["sha256"]


@dataclass
class ProcessorArtifact:
    """A loaded, verified artifact."""

    processor: Processor
    encoder: nn.Linear
    decoder: nn.Linear
    abstract_spec: AbstractSpec
    sha256: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    path: Path


def _project_processors() -> dict[str, type[Processor]]:
    """Concrete ``Processor`` subclasses defined in this repo's ``processors`` package (our own code)."""
    for info in pkgutil.iter_modules(processors.__path__):
        importlib.import_module(f"{processors.__name__}.{info.name}")
    found, todo = {}, list(Processor.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == processors.__name__ and not getattr(cls, "__abstractmethods__", None):
            found[class_path(cls)] = cls
    return found


def allowed_processors() -> dict[str, type[Processor]]:
    """class_path -> class of every processor an artifact may name: the project's own and those registered
    in the entry-point group (installed by the user, so trusted like any installed package)."""
    allowed = _project_processors()
    for ep in available_processors().values():
        cls = ep.load()
        if isinstance(cls, type) and issubclass(cls, Processor):
            allowed[class_path(cls)] = cls
            allowed[ep.value.replace(":", ".")] = cls  # the path the entry point gives, if it re-exports
    return allowed


def _check_plain(value: Any, where: Path, what: str) -> None:
    """Refuse anything but JSON-like values (numbers, text, bools, None, lists and str-keyed dicts of them)."""
    if isinstance(value, PLAIN_SCALARS):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_plain(item, where, what)
        return
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _check_plain(item, where, what)
        return
    raise ArtifactError(
        f"{where}: {what} holds a {type(value).__name__}; only numbers, text, booleans, None, lists and dicts "
        "are allowed in an artifact's config. Re-run `make pretrain` to write a valid one"
    )


def check_rebuildable(processor: Processor, where: str | Path = "processor") -> None:
    """Refuse, before any training, a processor that an artifact could not name or rebuild."""
    allowed = allowed_processors()
    if class_path(processor) not in allowed:
        raise ArtifactError(
            f"{where}: {class_path(processor)} is neither registered in the entry-point group "
            f"'rmr_lightning.processors' nor part of the processors package, so its artifact could not be loaded; "
            f"register it (see processors/registry.py) or use one of {sorted(allowed)}"
        )
    _check_plain(processor.init_args(), Path(where), "processor init_args")


def _allowed_class(config: Any, where: Path, part: str) -> type[nn.Module]:
    """The class a config names, looked up in the allow-list; nothing named by the file is imported."""
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise ArtifactError(f"{where}: the {part} config is not a {{'class_path': ..., 'init_args': ...}} dict")
    name = config["class_path"]
    allowed = dict(allowed_processors()) if part == "processor" else dict.fromkeys(LINEAR_CLASS_PATHS, nn.Linear)
    if name not in allowed:
        raise ArtifactError(
            f"{where}: the {part} config names {name!r}, which is not allowed in a processor artifact "
            f"(allowed: {sorted(allowed)}); only a file written by `make pretrain` with a registered processor loads"
        )
    _check_plain(config.get("init_args", {}), where, f"the {part} init_args")
    if not isinstance(config.get("init_args", {}), dict):
        raise ArtifactError(f"{where}: the {part} init_args are not a dict")
    return allowed[name]


def _build(config: dict[str, Any], state_dict: dict[str, Tensor], where: Path, part: str) -> nn.Module:
    cls = _allowed_class(config, where, part)
    try:
        module = cls(**config.get("init_args", {}))
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: {part} config does not rebuild {cls.__name__}: {err}") from err
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state_dict))
        if state_dict[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        raise ArtifactError(
            f"{where}: {part} weights do not match {cls.__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    module.load_state_dict(state_dict, strict=True)
    return module


def _read(path: Path) -> dict[str, Any]:
    """The payload of a version-2 artifact, with every part present, or an ``ArtifactError`` naming the file."""
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no processor artifact here; run `make pretrain` "
            "or pass --model.init_args.processor_artifact=PATH "
            "(in Python: load_from_checkpoint(..., processor_artifact=PATH))"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding objects other than tensors and plain values
        raise ArtifactError(
            f"{path}: not a readable processor artifact ({type(err).__name__}: {str(err)[:300]})"
        ) from err
    required = ("state_dict", "config", "sha256", "encoder", "decoder", "abstract_spec")
    if not isinstance(payload, dict) or any(k not in payload for k in required):
        present = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ArtifactError(f"{path}: not a processor artifact (needs keys {list(required)}, found {present})")
    version = payload.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        raise ArtifactError(
            f"{path}: artifact format version {version}, but this rmr_lightning reads version {FORMAT_VERSION} "
            "(whose hash also covers the configs and abstract_spec); re-run `make pretrain` (or the pretraining "
            "that wrote it) to write it anew"
        )
    if not all(
        isinstance(payload[k], dict) and {"state_dict", "config"} <= set(payload[k]) for k in ("encoder", "decoder")
    ):
        raise ArtifactError(f"{path}: not a processor artifact (encoder and decoder need a state_dict and a config)")
    return payload


def _verify(payload: dict[str, Any], path: Path) -> None:
    """Refuse a file whose parts differ from the digests it records, naming the parts that differ."""
    try:
        actual = part_digests(payload)
    except (TypeError, ValueError, AttributeError, RuntimeError) as err:  # e.g. a non-JSON value in abstract_spec
        raise ArtifactError(f"{path}: cannot hash the artifact's content ({type(err).__name__}: {err})") from err
    recorded = payload.get("digests") if isinstance(payload.get("digests"), dict) else {}
    differ = [PART_NAMES[p] for p in PARTS if recorded.get(p) != actual[p]]
    if differ:
        raise ArtifactError(
            f"{path}: corrupt or edited: the {', '.join(differ)} differ from the digests recorded in the file; "
            "re-run `make pretrain`"
        )
    if payload["sha256"] != content_sha256(actual):
        raise ArtifactError(
            f"{path}: corrupt: the content sha256 {str(payload['sha256'])[:12]}... differs from that of its parts"
        )


def _warn_if_cut_short(metrics: dict[str, Any], path: Path) -> None:
    """A P whose pretraining stopped before its planned steps is weaker than its config promises: say so."""
    done, planned = metrics.get("completed_steps"), metrics.get("planned_steps")
    stopped = metrics.get("stopped_by")
    if stopped in (None, "max_steps", "max_epochs") and not (
        isinstance(done, (int, float)) and isinstance(planned, (int, float)) and done < planned
    ):
        return
    warnings.warn(
        f"{path}: P was pretrained for {done} of {planned} planned steps (stopped by {stopped}); it may be weaker "
        "than its config promises. Pretrain again (or resume with --ckpt_path last) to complete it",
        UserWarning,
        stacklevel=3,
    )


def load_processor_artifact(path: str | Path, expected_hidden_dim: int | None = None) -> ProcessorArtifact:
    """Read, verify and rebuild an artifact; raise ``ArtifactError`` naming the file on any mismatch."""
    path = Path(path)
    payload = _read(path)
    _verify(payload, path)
    processor = _build(payload["config"], payload["state_dict"], path, "processor")
    if expected_hidden_dim is not None and processor.hidden_dim != expected_hidden_dim:
        raise ArtifactError(
            f"{path}: processor width {processor.hidden_dim} differs from the expected {expected_hidden_dim}"
        )
    encoder = _build(payload["encoder"]["config"], payload["encoder"]["state_dict"], path, "encoder")
    decoder = _build(payload["decoder"]["config"], payload["decoder"]["state_dict"], path, "decoder")
    try:
        spec = AbstractSpec.from_dict(payload["abstract_spec"])
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: its abstract_spec is not a valid AbstractSpec: {err}") from err
    metrics = dict(payload.get("metrics") or {})
    _warn_if_cut_short(metrics, path)
    return ProcessorArtifact(
        processor=processor,
        encoder=encoder,
        decoder=decoder,
        abstract_spec=spec,
        sha256=payload["sha256"],
        config=payload["config"],
        metrics=metrics,
        path=path,
    )
