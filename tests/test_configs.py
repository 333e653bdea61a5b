"""Every shipped config parses, and each task config trains for a step (``fast_dev_run``)."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
import yaml

from datamodules.configs import LoaderConfig, SplitConfig
from rmr_lightning.cli import cli_main
from rmr_lightning.data.connectome import load_dk84
from rmr_lightning.finetuning import NaturalFinetuning
from rmr_lightning.study import parse_study, run_study
from tests.helpers import REPO, TINY_PRETRAIN, tiny_lesion, tiny_manifest, tiny_natural

# Pretraining variants other than the default are stacked on it (`--config ndm.yaml --config fkpp.yaml`).
PRETRAIN = [["configs/pretrain/ndm.yaml"]] + [
    ["configs/pretrain/ndm.yaml", str(p.relative_to(REPO))]
    for p in sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
    if p.name != "ndm.yaml"
]
# Natural configs without a model class are stacked on their task's config: fkpp.yaml on the MRI task,
# lesion_manifest.yaml on the lesion task.
NATURAL = [
    [str(p.relative_to(REPO))]
    if "class_path: rmr_lightning.finetuning" in p.read_text()
    else [
        f"configs/natural/{'lesion_ct' if p.name.startswith('lesion') else 'brain_mri'}.yaml",
        str(p.relative_to(REPO)),
    ]
    for p in sorted((REPO / "configs" / "natural").glob("*.yaml"))
]
CONFIGS = PRETRAIN + NATURAL


def _config_args(configs: list[str]) -> list[str]:
    return [arg for config in configs for arg in ("--config", config)]


@pytest.mark.parametrize("configs", CONFIGS, ids=lambda c: c[-1])
def test_config_parses(configs: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *_config_args(configs), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def _fit(args: list[str]) -> object:
    cli = cli_main(args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


@pytest.mark.parametrize(
    ("configs", "param_names"),
    [
        (["configs/pretrain/ndm.yaml"], ["gamma", "t"]),
        (["configs/pretrain/ndm.yaml", "configs/pretrain/fkpp.yaml"], ["gamma", "alpha", "t"]),
    ],
    ids=["ndm", "fkpp"],
)
def test_pretrain_config_fast_dev_run_writes_the_artifact(
    configs: list[str], param_names: list[str], tmp_path: Path
) -> None:
    cli = _fit(
        [
            *_config_args(configs),
            *TINY_PRETRAIN,
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.callbacks=[{'class_path': 'rmr_lightning.callbacks.PretrainingArtifacts', "
            f"'init_args': {{'dirpath': '{tmp_path}'}}}}]",
        ]
    )
    assert cli.trainer.global_step == 1
    payload = torch.load(tmp_path / "processor.pt", weights_only=True)
    assert payload["config"]["class_path"] == "processors.mpnn.MPNNProcessor"
    assert payload["abstract_spec"]["param_names"] == param_names


def test_lesion_pretrain_config_trains_a_deep_mlp_on_gompertz(tmp_path: Path) -> None:
    cli = _fit(
        [
            "--config",
            "configs/pretrain/ndm.yaml",
            "--config",
            "configs/pretrain/gompertz.yaml",
            "--data.init_args.num_train=256",
            "--data.init_args.num_val=32",
            "--data.init_args.num_test=32",
            "--model.init_args.hidden_dim=16",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.callbacks=[{'class_path': 'rmr_lightning.callbacks.PretrainingArtifacts', "
            f"'init_args': {{'dirpath': '{tmp_path}'}}}}]",
        ]
    )
    assert cli.trainer.global_step == 1
    payload = torch.load(tmp_path / "processor.pt", weights_only=True)
    assert payload["config"]["class_path"] == "processors.mlp.MLPProcessor"
    assert payload["abstract_spec"]["param_names"] == ["r", "t"] and payload["abstract_spec"]["param_decay"] == [
        0.3,
        0.0,
    ]


def test_lesion_natural_config_fast_dev_run(tiny_lesion_artifact: Path, tmp_path: Path) -> None:
    cli = _fit(
        [
            "--config",
            "configs/natural/lesion_ct.yaml",
            *tiny_lesion(tiny_lesion_artifact),
            f"--data.init_args.cache_dir={tmp_path}",
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 1 and cli.model.model.num_regions == 1 and cli.model.model.subject_params == ["r"]
    # the checkpoint alone rebuilds the non-default encoder (tiny widths, histogram features) of the config
    cli.trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = NaturalFinetuning.load_from_checkpoint(tmp_path / "model.ckpt")
    assert (
        loaded.model.encoder.out_channels == 4
        and loaded.model.encoder.histogram_bins == cli.model.model.encoder.histogram_bins > 0
    )
    for key, value in cli.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("flag_head", [True, False])
def test_lesion_predict_writes_volumes_doubling_times_and_flags(
    flag_head: bool, tiny_lesion_artifact: Path, tmp_path: Path
) -> None:
    """Suspicious: the flag's probability at the validation's operating point where the model has the flag
    (the lesion config), else the predicted doubling time under 400 d."""
    # a config file, as jsonargparse reads `--...readout.flag_days=null` inside an optional dataclass as a string
    no_flag = tmp_path / "no_flag.yaml"
    no_flag.write_text("model:\n  init_args:\n    readout:\n      flag_days: null\n")
    writer = {
        "class_path": "rmr_lightning.prediction.GrowthPredictionWriter",
        "init_args": {"output_dir": str(tmp_path / "pred"), "max_figures": 1},
    }
    cli = cli_main(
        [
            "--config",
            "configs/natural/lesion_ct.yaml",
            *tiny_lesion(tiny_lesion_artifact),
            f"--data.init_args.cache_dir={tmp_path}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.callbacks=[{writer}]",
            *([] if flag_head else ["--config", str(no_flag)]),
        ],
        run=False,
    )
    if flag_head:
        cli.model.model.flag_threshold.fill_(0.37)  # as a validation would have set it
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(frame) == 2 and {
        "horizon",
        "lesion_baseline",
        "lesion_followup",
        "lesion_vdt_days",
        "lesion_suspicious",
    } <= set(frame.columns)
    v0, v1, t = frame["lesion_baseline"], frame["lesion_followup"], frame["horizon"]
    grows = (v0 > 0) & (v1 > v0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = t * 365.25 * np.log(2.0) / np.log(v1 / v0)
    assert np.allclose(frame["lesion_vdt_days"][grows], expected[grows])
    if flag_head:
        assert frame["flag_threshold"].eq(0.37).all() and frame["lesion_flag_probability"].between(0, 1).all()
        assert (frame["lesion_suspicious"] == (frame["lesion_flag_probability"] >= 0.37)).all()
    else:
        assert "lesion_flag_probability" not in frame
        assert (frame["lesion_suspicious"] == (grows & (expected < 400.0))).all()
    assert [p.name for p in (tmp_path / "pred" / "figures").glob("*.png")] == ["subject_0000.png"]


@pytest.mark.parametrize("config", ["configs/natural/brain_mri.yaml", "configs/natural/brain_ct.yaml"])
def test_natural_config_fast_dev_run(config: str, tiny_artifact: Path, tmp_path: Path) -> None:
    cli = _fit(
        [
            "--config",
            config,
            *tiny_natural(tiny_artifact),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.trainer.global_step == 1
    # grouped arguments: the config's YAML mappings merged with the dotted overrides and the defaults
    dm = cli.datamodule
    assert dm.split == SplitConfig(train_pool=4, train_size=4, subset_seed=0, num_val=2, num_test=2)
    assert dm.loader == LoaderConfig(batch_size=2, num_workers=0)
    assert dm.disease.cohort_params == {"gamma": 0.15} and tuple(dm.disease.horizon) == (1.0, 4.0)
    # a checkpoint holds them as plain dicts, readable with weights_only=True
    cli.trainer.save_checkpoint(tmp_path / "grouped.ckpt")
    saved = torch.load(tmp_path / "grouped.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert saved["split"] == asdict(dm.split) and saved["loader"] == {"batch_size": 2, "num_workers": 0}
    assert saved["disease"]["cohort_params"] == {"gamma": 0.15}


def test_test_and_predict_in_a_new_process_find_the_best_checkpoint_of_the_fit(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    args = [
        "--config",
        "configs/natural/brain_mri.yaml",
        *tiny_natural(tiny_artifact),
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    fit = cli_main(
        [
            "fit",
            *args,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
        ]
    )
    best = fit.trainer.checkpoint_callback.best_model_path
    assert Path(best).parent == tmp_path / "checkpoints" and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    test = cli_main(["test", *args, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path", "best"])
    assert test.trainer.ckpt_path == best
    # preprocessing other than the fit's (a fit-time override forgotten) is refused, naming the setting to pass
    with pytest.raises(ValueError, match=r"fitted with other preprocessing.*--data.init_args.spacing=8 \(now 6\)"):
        cli_main(
            [
                "predict",
                *args,
                f"--trainer.default_root_dir={tmp_path}",
                "--data.init_args.spacing=6",
                "--ckpt_path",
                "best",
            ]
        )
    with pytest.raises(ValueError, match="--ckpt_path best: no checkpoint in the checkpoint folders"):
        cli_main(["predict", *args, f"--trainer.default_root_dir={tmp_path / 'never_fitted'}", "--ckpt_path", "best"])


def test_fkpp_phantoms_with_an_fkpp_processor(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    """configs/natural/fkpp.yaml end to end: an FKPP artifact, FKPP phantoms, cohort gamma and alpha learned."""
    _fit(
        [
            *_config_args(["configs/pretrain/ndm.yaml", "configs/pretrain/fkpp.yaml"]),
            *TINY_PRETRAIN,
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            "--trainer.callbacks=[{'class_path': 'rmr_lightning.callbacks.PretrainingArtifacts', "
            f"'init_args': {{'dirpath': '{tmp_path}'}}}}]",
        ]
    )
    natural = ["--config", "configs/natural/brain_mri.yaml", "--config", "configs/natural/fkpp.yaml"]
    cli = _fit(
        [
            *natural,
            *tiny_natural(tmp_path / "processor.pt"),
            "--trainer.fast_dev_run=true",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert type(cli.datamodule.algorithm).__name__ == "FisherKPP"
    assert cli.model.model.param_names == ["gamma", "alpha", "t"]
    assert cli.model.model.param_high[1].item() == pytest.approx(1.0) and cli.model.model.param_low[
        1
    ].item() == pytest.approx(0.3)  # alpha's range
    assert not [w for w in recwarn if "emulates another algorithm" in str(w.message)]


def test_a_diffusion_processor_on_fkpp_phantoms_warns(tiny_artifact: Path, tmp_path: Path) -> None:
    args = [
        "--config",
        "configs/natural/brain_mri.yaml",
        "--config",
        "configs/natural/fkpp.yaml",
        *tiny_natural(tiny_artifact),
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.warns(UserWarning, match="FisherKPP.*emulates another algorithm"):
        _fit(args)


def test_a_processor_of_another_algorithm_with_the_same_parameters_warns(tiny_artifact: Path, tmp_path: Path) -> None:
    args = [
        "--config",
        "configs/natural/brain_mri.yaml",
        "--data.init_args.algorithm=tests.helpers.FasterDiffusion",
        *tiny_natural(tiny_artifact),
        "--trainer.fast_dev_run=true",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    with pytest.warns(UserWarning, match="FasterDiffusion.*pretrained on NetworkDiffusion.*emulates another algorithm"):
        _fit(args)


def test_manifest_config_fits_and_predicts_with_a_readout(
    phantom_manifest: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    common = [
        "--config",
        "configs/natural/manifest.yaml",
        *tiny_manifest(phantom_manifest, tiny_artifact),
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks=[{'class_path': 'rmr_lightning.prediction.RegionalPredictionWriter', "
        f"'init_args': {{'output_dir': '{tmp_path / 'pred'}', 'max_figures': 2}}}}]",
    ]
    cli = _fit([*common, "--trainer.max_steps=2", "--trainer.val_check_interval=1"])
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    frame = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert sorted(frame["subject_id"]) == [f"sub-{i:02d}" for i in range(8)]
    assert {"Bankssts_L_followup", "Bankssts_L_baseline", "Bankssts_L_state"} <= set(frame.columns)
    assert len(list((tmp_path / "pred" / "figures").glob("*.png"))) == 2
    # regions missing from a subject's label map are named: their values carry no image evidence
    names = load_dk84()[1]
    labels = set(tio.LabelMap(phantom_manifest.parent / "sub-00_dseg.nii.gz").data.unique().tolist())
    absent = [n for r, n in enumerate(names, 1) if r not in labels]
    assert absent and frame.set_index("subject_id").loc["sub-00", "absent_regions"].split(";") == absent


def test_the_study_runs_on_a_manifest_of_scans(phantom_manifest: Path, tiny_artifact: Path, tmp_path: Path) -> None:
    """configs/study/manifest.yaml: each run trains on split.train_size subjects of the manifest's training split."""
    study = parse_study(
        [
            "--config",
            "configs/study/manifest.yaml",
            f"--output_dir={tmp_path / 'study'}",
            "--variants=[rmr]",
            "--train_sizes=[2, 4]",
            "--seeds=[0]",
            "--logger=none",
            "--workers=1",
        ]
    )
    study.overrides = [
        *tiny_manifest(phantom_manifest, tiny_artifact),
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    ]
    frame = run_study(study)
    # no baseline columns in this manifest: no change to score, so the summary scores the follow-up value
    assert (
        list(frame["n_train"]) == [2, 4] and frame["test_mae"].isna().all() and frame["test_mae_followup"].gt(0).all()
    )
    assert "follow-up value (no baseline values" in (tmp_path / "study" / "summary.md").read_text()
    saved = [
        yaml.safe_load(p.read_text())
        for p in sorted((tmp_path / "study" / "runs").glob("rmr_n*_seed0/checkpoints/config.yaml"))
    ]
    assert [c["data"]["init_args"]["split"]["train_size"] for c in saved] == [2, 4]


def test_cli_with_args_ignores_and_keeps_the_callers_argv(
    monkeypatch: pytest.MonkeyPatch, recwarn: pytest.WarningsRecorder
) -> None:
    """rmr-study drives the CLI in-process: its own argv must neither leak into a run nor be lost."""
    argv = ["rmr-study", "--config", "configs/study/demo.yaml"]
    monkeypatch.setattr("sys.argv", argv[:])
    cli = cli_main(["--config", "configs/pretrain/ndm.yaml", *TINY_PRETRAIN, "--trainer.logger=false"], run=False)
    assert cli.model.hparams.hidden_dim == 16
    assert sys.argv == argv
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_default_root_dir_moves_every_output_of_pretraining(tmp_path: Path) -> None:
    """``{default_root_dir}`` in the shipped config: one override moves artifact, checkpoints and logs."""
    root = tmp_path / "short"
    cli = _fit(
        [
            "--config",
            "configs/pretrain/ndm.yaml",
            *TINY_PRETRAIN,
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir={default_root_dir}",
            f"--trainer.default_root_dir={root}",
        ]
    )
    assert (root / "processor.pt").is_file() and (root / "checkpoints" / "last.ckpt").is_file()
    assert Path(cli.trainer.logger.save_dir) == root
    saved = list(root.rglob("config.yaml"))
    assert saved and all("{default_root_dir}" not in p.read_text() and str(root) in p.read_text() for p in saved)
