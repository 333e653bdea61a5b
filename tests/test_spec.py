"""``AbstractSpec`` (the typed abstract spec) and the declared datamodule protocols."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.abstract import AbstractGraphDataModule
from datamodules.brain_phantom import BrainPhantomDataModule
from datamodules.lesion_abstract import AbstractLesionDataModule
from datamodules.lesion_ct import LesionCTDataModule
from rmr_lightning.algorithms import AbstractSpec, FisherKPP, GompertzGrowth, GraphAlgorithm, NetworkDiffusion
from rmr_lightning.artifact import json_sha256
from rmr_lightning.cli import _data_abstract_spec, _data_covariate_names
from rmr_lightning.pretraining import ProcessorPretraining, default_abstract_spec
from rmr_lightning.protocols import HasAbstractSpec, HasAlgorithm, HasCovariates, HasTestNames, HasTrainTable


def dict_spec(algorithm: GraphAlgorithm) -> dict:
    """The dict the datamodule wrote before ``AbstractSpec``: artifacts made since hold exactly this."""
    return {
        "algorithm": repr(algorithm),
        "param_names": list(algorithm.param_names),
        "param_scale": [max(abs(lo), abs(hi)) or 1.0 for lo, hi in algorithm.ranges.values()],
        "param_ranges": [list(algorithm.ranges[name]) for name in algorithm.param_names],
        "time_param": algorithm.time_param,
        "param_decay": list(algorithm.param_decay),
        "max_time": algorithm.max_time,
    }


@pytest.mark.parametrize("algorithm", [NetworkDiffusion(), FisherKPP(), GompertzGrowth(), NetworkDiffusion(t=(0, 2))])
def test_the_stored_dict_and_its_digest_are_those_of_the_untyped_spec(algorithm: GraphAlgorithm) -> None:
    spec = AbstractSpec.from_algorithm(algorithm)
    legacy = dict_spec(algorithm)
    assert spec.to_dict() == legacy and list(spec.to_dict()) == list(legacy)
    assert json_sha256(spec.to_dict()) == json_sha256(legacy)
    assert AbstractSpec.from_dict(legacy) == spec and AbstractSpec.from_dict(spec) is spec


def test_a_hand_written_spec_round_trips_without_gaining_keys() -> None:
    minimal = {"param_names": ["gamma", "t"], "param_scale": [0.6, 4.0], "time_param": "t", "max_time": 4.0}
    spec = AbstractSpec.from_dict(minimal)
    assert spec.to_dict() == minimal
    assert spec.ranges == ((0.0, 0.6), (0.0, 4.0)) and spec.decay == (0.0, 0.0) and spec.algorithm_name == ""
    assert spec.time_index == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"param_names": ["g"], "param_scale": [1.0], "colour": "red"}, "unknown keys \\['colour'\\]"),
        ({"param_names": ["g"]}, "missing keys \\['param_scale'\\]"),
        ({"param_names": ["g", "t"], "param_scale": [1.0]}, "param_scale has 1 entries"),
        ({"param_names": ["g"], "param_scale": [1.0], "time_param": "t"}, "time_param 't' is not one of"),
    ],
)
def test_an_inconsistent_spec_is_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AbstractSpec.from_dict(bad)


def test_pretraining_takes_a_spec_or_its_dict_and_keeps_the_dict_in_its_hyperparameters() -> None:
    spec = AbstractSpec.from_algorithm(GompertzGrowth())
    for given in (spec, spec.to_dict()):
        model = ProcessorPretraining(processor="mlp", hidden_dim=8, abstract_spec=given)
        assert model.abstract_spec == spec and model.hparams["abstract_spec"] == spec.to_dict()
        assert type(model.hparams["abstract_spec"]) is dict
        assert torch.equal(model.param_decay, torch.tensor(spec.decay))
    default = ProcessorPretraining(processor="mlp", hidden_dim=8)
    assert default.hparams["abstract_spec"] is None
    assert default.abstract_spec == default_abstract_spec() == AbstractSpec.from_algorithm(NetworkDiffusion())
    assert default.abstract_spec.param_scale == (0.6, 4.0) and default.max_time == 4.0 and default.time_index == 1


def test_each_datamodule_declares_what_it_provides(tmp_path: Path) -> None:
    """The table in rmr_lightning/protocols.py."""
    protocols = (HasAlgorithm, HasAbstractSpec, HasCovariates, HasTrainTable, HasTestNames)
    expected = {
        AbstractGraphDataModule(): {HasAlgorithm, HasAbstractSpec, HasTestNames},
        AbstractLesionDataModule(): {HasAlgorithm, HasAbstractSpec, HasTestNames},
        BrainPhantomDataModule(cache_dir=str(tmp_path)): {HasAlgorithm, HasCovariates, HasTrainTable},
        LesionCTDataModule(cache_dir=str(tmp_path)): {HasCovariates, HasTrainTable},
    }
    for datamodule, provides in expected.items():
        assert {p for p in protocols if isinstance(datamodule, p)} == provides, type(datamodule).__name__
    abstract, phantoms = list(expected)[0], list(expected)[2]
    assert _data_abstract_spec(abstract) == abstract.abstract_spec.to_dict() and _data_abstract_spec(phantoms) is None
    assert _data_covariate_names(phantoms) == phantoms.covariate_names and _data_covariate_names(abstract) is None
