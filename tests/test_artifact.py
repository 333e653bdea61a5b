"""The processor artifact: round trip, and refusals with errors that name the file."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from processors import GATv2Processor, MPNNProcessor
from rmr_lightning.algorithms import AbstractSpec
from rmr_lightning.artifact import (
    ArtifactError,
    check_rebuildable,
    content_sha256,
    load_processor_artifact,
    part_digests,
    save_processor_artifact,
    state_dict_sha256,
)

SPEC = {"param_names": ["gamma", "t"], "param_scale": [0.6, 4.0], "time_param": "t", "max_time": 4.0}


def _save(path: Path, processor=None, metrics=None) -> str:
    processor = processor or MPNNProcessor(16, num_layers=2)
    metrics = {"r2": 0.9} if metrics is None else metrics
    return save_processor_artifact(
        path, processor, torch.nn.Linear(3, 16), torch.nn.Linear(16, 1), SPEC, metrics=metrics
    )


def _edit(path: Path, change) -> None:
    """Rewrite an artifact with one part changed, as a tampering or damaged copy would be."""
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)


class Marker:
    """Unpickling this touches a file: the proof that code ran while a file was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    proc = GATv2Processor(16, num_layers=2, heads=2)
    sha = _save(tmp_path / "processor.pt", proc)
    raw = torch.load(tmp_path / "processor.pt", weights_only=True)
    assert set(raw) >= {"state_dict", "config", "sha256", "digests", "format_version"}
    assert set(raw["state_dict"]) == set(proc.state_dict())  # P's weights alone
    assert raw["config"] == {
        "class_path": "processors.gatv2.GATv2Processor",
        "init_args": {"hidden_dim": 16, "num_layers": 2, "act": "relu", "heads": 2},
    }
    assert raw["digests"]["processor"] == state_dict_sha256(proc.state_dict())
    art = load_processor_artifact(tmp_path / "processor.pt", expected_hidden_dim=16)
    assert art.sha256 == sha == content_sha256(part_digests(raw))
    for key, value in proc.state_dict().items():
        assert torch.equal(art.processor.state_dict()[key], value)
    assert art.abstract_spec == AbstractSpec.from_dict(SPEC) and art.metrics == {"r2": 0.9}
    assert raw["abstract_spec"] == SPEC  # stored as the plain dict it was given


@pytest.mark.parametrize(
    "part, change",
    [
        (
            "processor weights",
            lambda raw: raw["state_dict"][next(iter(raw["state_dict"]))].view(-1).__setitem__(0, 9.0),
        ),
        ("encoder \\(f\\) weights", lambda raw: raw["encoder"]["state_dict"]["weight"].mul_(1.01)),
        ("decoder \\(g\\) weights", lambda raw: raw["decoder"]["state_dict"]["bias"].add_(0.5)),
        ("rebuild configs", lambda raw: raw["config"]["init_args"].__setitem__("act", "gelu")),
        ("abstract_spec", lambda raw: raw["abstract_spec"].__setitem__("max_time", 8.0)),
    ],
)
def test_any_edited_part_is_refused_by_name(tmp_path: Path, part: str, change) -> None:
    """The hash covers everything that shapes the model; the error says which part differs."""
    path = tmp_path / "processor.pt"
    _save(path)
    _edit(path, change)
    with pytest.raises(ArtifactError, match=rf"{path}.*corrupt or edited: the {part} differ"):
        load_processor_artifact(path)


def test_recomputed_top_hash_does_not_hide_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path)
    _edit(path, lambda raw: raw.__setitem__("sha256", "0" * 64))
    with pytest.raises(ArtifactError, match="content sha256"):
        load_processor_artifact(path)


def test_a_config_naming_any_callable_is_refused_before_import(tmp_path: Path) -> None:
    """A class_path of os.system with a command argument must not run, even with matching digests."""
    path, marker = tmp_path / "processor.pt", tmp_path / "pwned"

    def to_os_system(raw):
        raw["config"] = {"class_path": "os.system", "init_args": {"command": f"touch {marker}"}}
        raw["digests"] = part_digests(raw)  # a forger recomputes the hashes: the allow-list must still refuse
        raw["sha256"] = content_sha256(raw["digests"])

    _save(path)
    _edit(path, to_os_system)
    with pytest.raises(ArtifactError, match=r"processor config names 'os.system', which is not allowed"):
        load_processor_artifact(path)
    _save(path)
    _edit(path, lambda raw: raw["encoder"]["config"].__setitem__("class_path", "subprocess.Popen"))
    with pytest.raises(ArtifactError):
        load_processor_artifact(path)
    assert not marker.exists()


def test_a_pickled_object_in_the_file_does_not_run(tmp_path: Path) -> None:
    path, marker = tmp_path / "processor.pt", tmp_path / "pwned"
    _save(path)
    raw = torch.load(path, weights_only=True)
    raw["metrics"]["note"] = Marker(marker)
    torch.save(raw, path)
    with pytest.raises(ArtifactError, match="not a readable processor artifact"):
        load_processor_artifact(path)
    assert not marker.exists()


def test_version_1_and_non_plain_arguments_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path)
    _edit(path, lambda raw: raw.__setitem__("format_version", 1))
    with pytest.raises(ArtifactError, match="format version 1.*make pretrain"):
        load_processor_artifact(path)
    _save(path)
    _edit(path, lambda raw: raw["config"]["init_args"].__setitem__("act", torch.zeros(2)))
    with pytest.raises(ArtifactError):
        load_processor_artifact(path)


def test_unregistered_processor_is_refused_before_training(tmp_path: Path) -> None:
    class Outsider(MPNNProcessor):  # defined in a test module: neither registered nor in processors/
        pass

    with pytest.raises(ArtifactError, match="Outsider is neither registered"):
        check_rebuildable(Outsider(16, num_layers=1))
    check_rebuildable(MPNNProcessor(16, num_layers=1))


def test_a_processor_cut_short_warns_on_load(tmp_path: Path) -> None:
    path = tmp_path / "processor.pt"
    _save(path, metrics={"completed_steps": 40, "planned_steps": 100, "stopped_by": "max_time"})
    with pytest.warns(UserWarning, match="40 of 100 planned steps \\(stopped by max_time\\)"):
        art = load_processor_artifact(path)
    assert art.metrics["stopped_by"] == "max_time"


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

    def deeper(raw):  # a config that no longer matches the weights, with digests recomputed
        raw["config"]["init_args"]["num_layers"] = 3
        raw["digests"] = part_digests(raw)
        raw["sha256"] = content_sha256(raw["digests"])

    _edit(path, deeper)
    with pytest.raises(ArtifactError, match="missing"):
        load_processor_artifact(path)
    _save(path)
    with pytest.raises(ArtifactError, match="width 16 differs from the expected 32"):
        load_processor_artifact(path, expected_hidden_dim=32)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    """A payload that cannot be pickled must not leave half a file or a stray temporary behind."""
    from rmr_lightning.files import atomic_torch_save

    path = tmp_path / "deep" / "cache.pt"
    atomic_torch_save({"x": torch.arange(3)}, path)
    with pytest.raises((AttributeError, pickle.PicklingError)):  # AttributeError before Python 3.14
        atomic_torch_save({"x": lambda: None}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["cache.pt"]
