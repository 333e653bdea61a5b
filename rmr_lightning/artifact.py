"""The processor artifact: the hand-off from pretraining to natural fine-tuning.

``processor.pt`` is a plain dict that ``torch.load(weights_only=True)`` reads::

    state_dict  P's weights alone
    config      {"class_path": ..., "init_args": {...}} that rebuild P
    sha256      hex digest of the weights (names, shapes, dtypes and bytes, in key order)
    encoder, decoder   {"state_dict", "config"} of the linear f and g (for alignment and readout)
    abstract_spec      the abstract inputs: state channels, parameter names/scales, rollout bound
    metrics            what the pretraining measured when the file was written

``load_processor_artifact`` rebuilds every part with strict key and shape checks and refuses a
corrupt or mismatched file with an error that names it and says what differs.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from processors.base import Processor
from rmr_lightning.files import atomic_torch_save

FORMAT_VERSION = 1


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


def class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def linear_config(layer: nn.Linear) -> dict[str, Any]:
    return {
        "class_path": "torch.nn.Linear",
        "init_args": {"in_features": layer.in_features, "out_features": layer.out_features, "bias": layer.bias is not None},
    }


def save_processor_artifact(
    path: str | Path,
    processor: Processor,
    encoder: nn.Linear,
    decoder: nn.Linear,
    abstract_spec: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> str:
    """Write ``processor.pt`` atomically (temp file then rename); returns the weights' sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in processor.state_dict().items()}
    sha = state_dict_sha256(state)
    payload = {
        "format_version": FORMAT_VERSION,
        "state_dict": state,
        "config": {"class_path": class_path(processor), "init_args": processor.init_args()},
        "sha256": sha,
        "encoder": {"state_dict": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}, "config": linear_config(encoder)},
        "decoder": {"state_dict": {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}, "config": linear_config(decoder)},
        "abstract_spec": dict(abstract_spec),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
    }
    atomic_torch_save(payload, path)
    return sha


@dataclass
class ProcessorArtifact:
    """A loaded, verified artifact."""

    processor: Processor
    encoder: nn.Linear
    decoder: nn.Linear
    abstract_spec: dict[str, Any]
    sha256: str
    config: dict[str, Any]
    metrics: dict[str, float]
    path: Path


def _import(path_str: str, where: Path) -> type:
    module_name, _, name = path_str.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ArtifactError(f"{where}: cannot import {path_str!r} named in the artifact's config ({err})") from err


def _build(config: dict[str, Any], state_dict: dict[str, Tensor], where: Path, part: str) -> nn.Module:
    cls = _import(config["class_path"], where)
    try:
        module = cls(**config.get("init_args", {}))
    except TypeError as err:
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


def load_processor_artifact(path: str | Path, expected_hidden_dim: int | None = None) -> ProcessorArtifact:
    """Read, verify and rebuild an artifact; raise ``ArtifactError`` naming the file on any mismatch."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(
            f"{path}: no processor artifact here; run `make pretrain` or pass --model.init_args.processor_artifact=PATH "
            "(in Python: load_from_checkpoint(..., processor_artifact=PATH))"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or not a torch file
        raise ArtifactError(f"{path}: not a readable processor artifact ({type(err).__name__}: {err})") from err
    required = ("state_dict", "config", "sha256", "encoder", "decoder", "abstract_spec")
    if not isinstance(payload, dict) or any(k not in payload for k in required):
        present = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise ArtifactError(f"{path}: not a processor artifact (needs keys {list(required)}, found {present})")
    actual = state_dict_sha256(payload["state_dict"])
    if actual != payload["sha256"]:
        raise ArtifactError(f"{path}: weights are corrupt: sha256 {actual[:12]}... differs from recorded {payload['sha256'][:12]}...")
    processor = _build(payload["config"], payload["state_dict"], path, "processor")
    if not isinstance(processor, Processor):
        raise ArtifactError(f"{path}: {payload['config']['class_path']} is not a Processor")
    if expected_hidden_dim is not None and processor.hidden_dim != expected_hidden_dim:
        raise ArtifactError(f"{path}: processor width {processor.hidden_dim} differs from the expected {expected_hidden_dim}")
    encoder = _build(payload["encoder"]["config"], payload["encoder"]["state_dict"], path, "encoder")
    decoder = _build(payload["decoder"]["config"], payload["decoder"]["state_dict"], path, "decoder")
    return ProcessorArtifact(
        processor=processor,
        encoder=encoder,
        decoder=decoder,
        abstract_spec=dict(payload["abstract_spec"]),
        sha256=payload["sha256"],
        config=payload["config"],
        metrics=dict(payload.get("metrics", {})),
        path=path,
    )
