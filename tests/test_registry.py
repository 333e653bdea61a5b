"""Short names from the entry-point group, including a third-party package that registers its own."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from processors import MPNNProcessor, available_processors, resolve_processor
from rmr_lightning.cli import cli_main


def test_builtin_names_resolve() -> None:
    assert {"mlp", "mpnn", "max_mpnn", "gatv2"} <= set(available_processors())
    assert resolve_processor("mpnn") is MPNNProcessor


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown processor 'nope'.*gatv2.*mpnn"):
        resolve_processor("nope")


def test_an_import_path_names_a_processor_without_registration() -> None:
    assert resolve_processor("processors.mpnn.MPNNProcessor") is MPNNProcessor
    assert resolve_processor("processors.mpnn:MPNNProcessor") is MPNNProcessor
    with pytest.raises(ValueError, match=r"processor 'processors.mpnn.Nope': cannot import it"):
        resolve_processor("processors.mpnn.Nope")
    with pytest.raises(TypeError, match="not a subclass of processors.base.Processor"):
        resolve_processor("torch.nn.Linear")


@pytest.fixture
def third_party_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution (package + dist-info, as pip lays it out) registering ``tiny_gnn``."""
    pkg = tmp_path / "tiny_rmr_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from processors.base import Processor

            class _Layer(nn.Module):
                def __init__(self, hidden_dim):
                    super().__init__()
                    self.lin = nn.Linear(hidden_dim, hidden_dim)

                def forward(self, h, graph):
                    return self.lin(h)

            class TinyProcessor(Processor):
                '''A third-party processor: one linear map per layer.'''

                def init_layer(self, hidden_dim):
                    return _Layer(hidden_dim)
            """
        )
    )
    info = tmp_path / "tiny_rmr_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-rmr-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rmr_lightning.processors]\ntiny_gnn = tiny_rmr_plugin:TinyProcessor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("tiny_rmr_plugin", None)


def test_third_party_processor_by_short_name_through_the_cli(third_party_package: Path, tmp_path: Path) -> None:
    assert "tiny_gnn" in available_processors()
    args = [
        "--config",
        "configs/pretrain/ndm.yaml",
        "--model.init_args.processor=tiny_gnn",
        "--model.init_args.hidden_dim=8",
        "--data.init_args.num_train=64",
        "--data.init_args.num_val=16",
        "--data.init_args.num_test=16",
        "--data.init_args.num_graphs=8",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
        "--trainer.fast_dev_run=true",
        "--trainer.enable_progress_bar=false",
    ]
    cli = cli_main(args, run=False)
    assert type(cli.model.processor).__name__ == "TinyProcessor"
    assert cli.model.processor.hidden_dim == 8  # the pipeline passed the width in
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1


def test_class_path_with_init_args_and_width_from_the_pipeline(tmp_path: Path) -> None:
    args = [
        "--config",
        "configs/pretrain/ndm.yaml",
        "--model.init_args.processor=processors.GATv2Processor",
        "--model.init_args.processor.heads=2",
        "--model.init_args.hidden_dim=8",
        "--data.init_args.num_train=32",
        "--data.init_args.num_graphs=4",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false",
    ]
    cli = cli_main(args, run=False)
    assert cli.model.processor.heads == 2 and cli.model.processor.hidden_dim == 8
