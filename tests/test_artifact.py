"""The processor artifact: round trip, and refusals with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from processors import GATv2Processor, MPNNProcessor
from rmr_lightning.artifact import ArtifactError, load_processor_artifact, save_processor_artifact, state_dict_sha256

SPEC = {"param_names": ["gamma", "t"], "param_scale": [0.6, 4.0], "time_param": "t", "max_time": 4.0}


def _save(path: Path, processor=None) -> str:
    processor = processor or MPNNProcessor(16, num_layers=2)
    return save_processor_artifact(path, processor, torch.nn.Linear(3, 16), torch.nn.Linear(16, 1), SPEC, metrics={"r2": 0.9})


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    proc = GATv2Processor(16, num_layers=2, heads=2)
    sha = _save(tmp_path / "processor.pt", proc)
    raw = torch.load(tmp_path / "processor.pt", weights_only=True)
    assert set(raw) >= {"state_dict", "config", "sha256"}
    assert set(raw["state_dict"]) == set(proc.state_dict())  # P's weights alone
    assert raw["config"] == {"class_path": "processors.gatv2.GATv2Processor", "init_args": {"hidden_dim": 16, "num_layers": 2, "act": "relu", "heads": 2}}
    art = load_processor_artifact(tmp_path / "processor.pt", expected_hidden_dim=16)
    assert art.sha256 == sha == state_dict_sha256(proc.state_dict())
    for key, value in proc.state_dict().items():
        assert torch.equal(art.processor.state_dict()[key], value)
    assert art.abstract_spec == SPEC and art.metrics == {"r2": 0.9}


def test_corrupt_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    key = next(iter(raw["state_dict"]))
    raw["state_dict"][key].view(-1)[0] += 1.0
    torch.save(raw, path)
    with pytest.raises(ArtifactError, match=rf"{path}.*corrupt"):
        load_processor_artifact(path)


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ArtifactError, match="not a readable processor artifact"):
        load_processor_artifact(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ArtifactError, match="not a processor artifact"):
        load_processor_artifact(path)
    with pytest.raises(ArtifactError, match="make pretrain"):
        load_processor_artifact(tmp_path / "missing.pt")


def test_mismatched_shapes_keys_and_width_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path)
    raw = torch.load(path, weights_only=True)
    raw["config"]["init_args"]["num_layers"] = 3  # config no longer matches the weights
    torch.save(raw, path)
    with pytest.raises(ArtifactError, match="missing"):
        load_processor_artifact(path)
    _save(path)
    with pytest.raises(ArtifactError, match="width 16 differs from the expected 32"):
        load_processor_artifact(path, expected_hidden_dim=32)
    raw = torch.load(path, weights_only=True)
    raw["config"]["class_path"] = "processors.nowhere.Missing"
    torch.save(raw, path)
    with pytest.raises(ArtifactError, match="cannot import"):
        load_processor_artifact(path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    """A payload that cannot be pickled must not leave half a file or a stray temporary behind."""
    from rmr_lightning.files import atomic_torch_save

    path = tmp_path / "deep" / "cache.pt"
    atomic_torch_save({"x": torch.arange(3)}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"x": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["cache.pt"]
