"""The lesion-growth task: abstract pretraining data, CT phantoms, queue-streamed patches, fine-tuning."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DistributedSampler

from datamodules.lesion_abstract import AbstractLesionDataModule
from datamodules.lesion_ct import NODULE_TYPES, LesionCTDataModule, _LesionSubjects, render_lesion, simulate_lesions
from datamodules.manifest import ManifestDataModule
from rmr_lightning.algorithms import NODULE_VDT_DAYS, growth_rate
from rmr_lightning.cli import cli_main
from tests.helpers import REPO, ddp_fit_with_probe, subprocess_env, tiny_lesion, tiny_model

SMALL = dict(
    split={"train_pool": 6, "num_val": 2, "num_test": 2},
    nodules={"diameter_mm": (4.0, 8.0)},
    size=24,
    patch_size=16,
    roi_mm=5.0,
    loader={"batch_size": 2},
)


def _lesion_model(artifact: Path, head: dict | None = None, **kwargs):
    """The lesion task's natural model at test size: one isolated node, the rate estimated per scan."""
    from rmr_lightning.encoders import RegionCNN
    from rmr_lightning.finetuning import NaturalFinetuning

    return NaturalFinetuning(
        str(artifact),
        graph={"connectome": "isolated"},
        covariate_names=["horizon"],
        encoder=RegionCNN(widths=(2, 4, 4), out_channels=4),
        head={"region_centring": False, "subject_params": ["r"], **(head or {})},
        **kwargs,
    )


def test_abstract_lesions_are_single_nodes_following_gompertz():
    dm = AbstractLesionDataModule(num_train=64, num_val=8, num_test=8, loader={"batch_size": 16})
    dm.setup("fit")
    b = next(iter(dm.train_dataloader()))
    assert b.edge_index.shape == (2, 0) and b.x.shape == (16,) and torch.equal(b.batch, torch.arange(16))
    r, t = b.params[:, 0].double(), b.params[:, 1].double()
    expected = b.x.double() * torch.exp(r / 0.3 * (1 - torch.exp(-0.3 * t)))
    assert torch.allclose(b.y.double(), expected, rtol=1e-5)
    assert dm.abstract_spec.param_decay == (0.3, 0.0)  # the rate decays along a rollout


def test_follow_up_volume_uses_the_doubling_time_of_the_nodule_type():
    lesions = simulate_lesions(200, np.random.default_rng(0), (1, 1, 1), (6.0, 20.0), (0.5, 2.0), rho=0.0)
    v0, v1 = lesions["target"][:, 0, 0].double(), lesions["target"][:, 0, 1].double()
    t = lesions["covariates"][:, 0].double()
    vdt_days = t * math.log(2) / torch.log(v1 / v0) * 365.25  # exponential growth when rho = 0
    for k, name in enumerate(NODULE_TYPES):
        assert torch.allclose(
            vdt_days[lesions["kind"] == k], torch.tensor(NODULE_VDT_DAYS[name], dtype=torch.float64), rtol=1e-4
        )
    d = lesions["diameter"]
    assert torch.allclose(v0, math.pi / 6 * d**3 / 1000, rtol=1e-5)  # mL
    assert growth_rate(NODULE_VDT_DAYS["solid"]) > growth_rate(NODULE_VDT_DAYS["ground_glass"])


@pytest.mark.parametrize("kind", range(3))
def test_rendered_nodule_has_the_density_of_its_type(kind: int):
    hu, roi, sampling = render_lesion(kind, 16.0, 48, 1.0, 12.0, np.random.default_rng(kind))
    centre = torch.nonzero(sampling).float().mean(0)
    grid = torch.stack(torch.meshgrid(*(torch.arange(48.0),) * 3, indexing="ij"), -1)
    core = (grid - centre).norm(dim=-1) <= 3.0  # well inside the nodule
    shell = ((grid - centre).norm(dim=-1) > 14.0) & ((grid - centre).norm(dim=-1) < 18.0)
    inside, lung = float(hu[core].mean()), float(hu[shell].median())
    assert -950 < lung < -750
    if NODULE_TYPES[kind] == "ground_glass":
        assert -750 < inside < -400
    else:  # solid, or the solid core of a part-solid nodule
        assert inside > -150
    assert int(roi.sum()) == pytest.approx(4 / 3 * math.pi * 12**3, rel=0.03) and int(sampling.sum()) > 0


def test_queue_streams_lesion_centred_patches_of_training_subjects(tmp_path: Path):
    dm = LesionCTDataModule(
        **(SMALL | {"split": {**SMALL["split"], "train_size": 4}}), samples_per_volume=3, cache_dir=str(tmp_path)
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it in place under DDP
    train_ids = {f"lesion-ct-{i:05d}" for i in dm.splits["train"]}
    full_roi = int(dm.cohort["roi"][0].sum())
    seen = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        ids = []
        for b in loader:
            assert b.image.shape[2:] == (16, 16, 16) and b.target.shape[1:] == (1, 2)
            assert torch.all(b.labels.sum((1, 2, 3, 4)) >= full_roi * 0.9)  # the region of interest stays in the patch
            ids += b.subject_ids
        assert set(ids) == train_ids and len(ids) == 4 * 3
        seen.append(loader.sampler.queue.subject_sampler.epoch)
    assert seen == [0, 1]  # set_epoch reached the subject sampler


def test_centred_patch_outside_the_volume_is_refused(tmp_path: Path):
    dm = LesionCTDataModule(**{**SMALL, "roi_mm": 2.0}, cache_dir=str(tmp_path))
    dm.setup("fit")
    dm.cohort["sampling"][dm.splits["val"][0]].zero_()
    dm.cohort["sampling"][dm.splits["val"][0], 0, 0, 0, 0] = 1  # a nodule marked in the corner
    with pytest.raises(ValueError, match=r"lesion-ct-\d+.*leaves the volume"):
        next(iter(dm.val_dataloader()))


def test_lesion_finetuning_keeps_the_frozen_mlp_and_estimates_the_rate_per_subject(
    tiny_lesion_artifact: Path, tmp_path: Path
):
    import lightning as L

    from rmr_lightning.finetuning import NaturalFinetuning

    dm = LesionCTDataModule(**SMALL, cache_dir=str(tmp_path))
    model = _lesion_model(tiny_lesion_artifact, head={"state_init": 0.3}, readout={"state_unit": 4.18879})
    before = {k: v.clone() for k, v in model.model.processor.state_dict().items()}
    head = model.model.param_head[0].weight.clone()
    L.Trainer(
        max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    ).fit(model, dm)
    assert all(torch.equal(before[k], v) for k, v in model.model.processor.state_dict().items())
    assert not torch.equal(head, model.model.param_head[0].weight)  # the rate head learns through the frozen P
    b = next(iter(dm.val_dataloader()))
    abstract, *_ = model.model.encode(b)
    z = model.model.abstract_encoder(abstract)
    params = (
        model.model.abstract_params(b.covariates, model.model.encoder(b.image, b.labels, 1)[0][:, 0])
        * model.model.param_scale
    )
    low, high = model.model.param_low[0], model.model.param_high[0]
    assert z.shape == (2, model.model.processor.hidden_dim) and torch.all((params[:, 0] > low) & (params[:, 0] < high))
    with pytest.raises(ValueError, match="subject_params"):
        NaturalFinetuning(
            str(tiny_lesion_artifact),
            graph={"connectome": "isolated"},
            head={"subject_params": ["t"]},
            covariate_names=["horizon"],
        )


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_lesion_ddp_ranks_read_disjoint_subjects_from_their_queues(tiny_lesion_artifact: Path, tmp_path: Path):
    config = ["--config", "configs/natural/lesion_ct.yaml", *tiny_lesion(tiny_lesion_artifact)]
    ddp_fit_with_probe([*config, f"--data.init_args.cache_dir={tmp_path / 'cache'}"], tmp_path)
    orders = []
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / "seen" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in ranks)
        a, b = (set(r["subjects"]) for r in ranks)
        assert a and b and not a & b, (a, b)  # each rank's queue reads its own subjects
        assert len(a | b) == 6  # together they cover the training set
        orders.append(ranks[0]["subjects"])
    assert all(len(o) == 3 * 2 for o in orders)  # 3 subjects per rank, 2 patches each


@pytest.mark.parametrize("from_mean", [True, False])
def test_calibrated_change_starts_from_p_alone_or_from_the_mean(
    tiny_lesion_artifact: Path, tmp_path: Path, from_mean: bool
):
    """``change_from_mean=False``: at the start the predicted change is exactly P's change times the gain."""

    dm = LesionCTDataModule(**SMALL, cache_dir=str(tmp_path))
    dm.setup("fit")
    model = _lesion_model(tiny_lesion_artifact, readout={"state_unit": 4.0, "change_from_mean": from_mean}).eval()
    model.model.target_mean.fill_(5.0)
    b = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        out = model(b)
        abstract, *_ = model.model.encode(b)
        z = model.model.abstract_encoder(abstract)
        now, after = model.model.decoder(z).reshape(2, 1), model.model.decoder(model.model.process(z, 2)).reshape(2, 1)
    change = out["prediction"][..., 1] - out["prediction"][..., 0]
    expected = 4.0 * (after - now) + (5.0 if from_mean else 0.0)
    assert torch.allclose(change, expected, atol=1e-5)


def _loss_at_two_weights(artifact: Path, cache: Path, term: str, weight: float, **kwargs):
    """The small lesion cohort, a validation batch of it and the lesion model's loss on it with ``loss.<term>``
    at 0 and at ``weight`` (same seed): (cohort, batch, [loss at 0, loss at weight], outputs at weight, that model)."""
    dm = LesionCTDataModule(**SMALL, cache_dir=str(cache))
    dm.setup("fit")
    b = next(iter(dm.val_dataloader()))
    losses = []
    for w in (0.0, weight):
        torch.manual_seed(0)
        model = _lesion_model(artifact, loss={term: w}, **kwargs).eval()
        with torch.no_grad():
            loss, out = model.model_step(b)
        losses.append(loss)
    return dm, b, losses, out, model


def test_log_ratio_loss_adds_the_squared_error_of_log_growth(tiny_lesion_artifact: Path, tmp_path: Path):
    """``log_ratio_weight``: loss + w * mean (log(V1/V0)_pred - log(V1/V0)_true)^2 over positive targets."""

    _, b, losses, out, _ = _loss_at_two_weights(tiny_lesion_artifact, tmp_path, "log_ratio_weight", 2.0)
    pred, truth = out["prediction"].clamp_min(1e-6), b.target  # a volume predicted <= 0 counts as 1e-6
    assert (truth > 0).all()
    expected = ((torch.log(pred[..., 1] / pred[..., 0]) - torch.log(truth[..., 1] / truth[..., 0])) ** 2).mean()
    assert torch.allclose(losses[1] - losses[0], 2.0 * expected, rtol=1e-4)


def test_suspicious_growth_flag_is_a_classification_target(tiny_lesion_artifact: Path, tmp_path: Path):
    """``readout.flag_days``: labels are the true doubling time under the threshold (Schwartz 1961), the loss
    adds w * BCE of the flag's logit, and testing reports its AUROC and sensitivity at 90 % specificity."""
    import lightning as L

    readout = {"change_from_mean": False, "flag_days": 400}
    dm, b, losses, out, model = _loss_at_two_weights(
        tiny_lesion_artifact, tmp_path, "flag_weight", 3.0, readout=readout
    )
    v0, v1, years = b.target[..., 0].double(), b.target[..., 1].double(), b.covariates[:, :1].double()
    days = years * 365.25 * math.log(2) / torch.log(v1 / v0)
    expected = ((days > 0) & (days < 400)).float()
    assert torch.equal(out["flag_label"], expected)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["flag_logit"], expected)
    assert torch.allclose(losses[1] - losses[0], 3.0 * bce, rtol=1e-4)
    assert "flag_logit" not in _lesion_model(tiny_lesion_artifact).eval()(b)  # off unless asked for

    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model.train(), dm)
    results = trainer.test(model, dm, verbose=False)[0]
    assert 0.0 <= results["test/flag_auroc"] <= 1.0
    assert 0.0 <= results["test/flag_sensitivity_at_90_specificity"] <= 1.0


def _flag_scores(model, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, label) of the suspicious-growth flag over a loader's nodules."""
    probs, labels = [], []
    with torch.no_grad():
        for b in loader:
            _, out = model.model_step(b)
            probs.append(torch.sigmoid(out["flag_logit"]).flatten())
            labels.append(out["flag_label"].flatten())
    return torch.cat(probs), torch.cat(labels)


def test_flag_operating_point_is_chosen_on_validation_and_travels_in_the_checkpoint(
    tiny_lesion_artifact: Path, tmp_path: Path
):
    """Each validation sets ``flag_threshold`` to the probability where validation reaches 90 % specificity
    with the most sensitivity; the checkpoint keeps it and testing reports sensitivity and specificity there."""
    import lightning as L

    dm = LesionCTDataModule(
        **{**SMALL, "split": {"train_pool": 6, "num_val": 12, "num_test": 12}}, cache_dir=str(tmp_path)
    )
    readout = {"change_from_mean": False, "flag_days": 400}
    torch.manual_seed(0)
    model = _lesion_model(tiny_lesion_artifact, readout=readout)
    assert float(model.model.flag_threshold) == 0.5  # before any validation
    trainer = L.Trainer(max_steps=3, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    trainer.fit(model, dm)
    trainer.validate(model, dm, verbose=False)
    threshold = float(model.model.flag_threshold)
    prob, label = _flag_scores(model.eval(), dm.val_dataloader())
    assert 0 < label.sum() < len(label), "the small cohort needs both classes"

    def specificity(t: float) -> float:
        return float(((prob < t) & (label == 0)).sum() / (label == 0).sum())

    def sensitivity(t: float) -> float:
        return float(((prob >= t) & (label == 1)).sum() / (label == 1).sum())

    assert specificity(threshold) >= 0.9 - 1e-6
    best = max(sensitivity(float(t)) for t in prob if specificity(float(t)) >= 0.9 - 1e-6)
    assert sensitivity(threshold) == pytest.approx(best)

    trainer.save_checkpoint(tmp_path / "flag.ckpt")
    saved = torch.load(tmp_path / "flag.ckpt", weights_only=True)["state_dict"]
    assert float(saved["model.flag_threshold"]) == threshold
    older = _lesion_model(tiny_lesion_artifact, readout=readout)  # a checkpoint from before: 0.5, with a warning
    with pytest.warns(UserWarning, match="no operating point"):
        older.load_state_dict({k: v for k, v in saved.items() if k != "model.flag_threshold"})
    assert float(older.model.flag_threshold) == 0.5
    results = trainer.test(model, dm, verbose=False)[0]
    prob, label = _flag_scores(model.eval(), dm.test_dataloader())
    flagged = prob >= threshold
    assert results["test/flag_sensitivity_at_threshold"] == pytest.approx(
        float((flagged & (label == 1)).sum() / (label == 1).sum().clamp_min(1))
    )
    assert results["test/flag_specificity_at_threshold"] == pytest.approx(
        float((~flagged & (label == 0)).sum() / (label == 0).sum().clamp_min(1))
    )


def _lesion_fit(
    artifact: Path, cache: Path, root: Path, epochs: int, ckpt_path: str | None = None, stop_after: int | None = None
):
    import lightning as L
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Interrupt(Callback):  # the run dies after an epoch, its schedule still planned for all of them
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = stop_after is not None and trainer.current_epoch + 1 >= stop_after

    L.seed_everything(0)
    dm = LesionCTDataModule(**SMALL, cache_dir=str(cache))
    model = _lesion_model(artifact)
    checkpoint = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, save_last=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        callbacks=[checkpoint, Interrupt()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return model


def test_queue_epochs_reproduce_after_a_resume(tiny_lesion_artifact: Path, tmp_path: Path):
    """A fit resumed from the checkpoint of epoch 1 ends with the weights of an uninterrupted 3-epoch fit:
    each epoch's patches (subjects, centres, flips, order) depend on (seed, epoch) only."""
    reference = _lesion_fit(tiny_lesion_artifact, tmp_path / "cache", tmp_path / "ref", epochs=3)
    _lesion_fit(tiny_lesion_artifact, tmp_path / "cache", tmp_path / "cut", epochs=3, stop_after=1)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "cut").glob("epoch=*")) == ["epoch=0"], list(
        (tmp_path / "cut").iterdir()
    )
    resumed = _lesion_fit(
        tiny_lesion_artifact,
        tmp_path / "cache",
        tmp_path / "cut",
        epochs=3,
        ckpt_path=str(tmp_path / "cut" / "last.ckpt"),
    )
    ref, res = reference.state_dict(), resumed.state_dict()
    assert all(torch.allclose(ref[k].float(), res[k].float(), atol=1e-6) for k in ref)
    other = _lesion_fit(tiny_lesion_artifact, tmp_path / "cache", tmp_path / "two", epochs=3, stop_after=2)
    assert not torch.allclose(
        other.model.encoder.fuse.weight, reference.model.encoder.fuse.weight
    )  # the third epoch did train


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_exported_nodule_files_give_the_phantom_patches_and_fine_tune_through_the_manifest(
    tiny_lesion_artifact: Path, tmp_path: Path
) -> None:
    """Your own nodule scans: NIfTI files and a manifest, read by ``configs/natural/lesion_manifest.yaml``."""
    export = [sys.executable, "scripts/export_lesion_phantoms.py", str(tmp_path / "nodules"), "--subjects", "8"]
    done = subprocess.run(
        export,
        cwd=REPO,
        env=subprocess_env(PYTHONPATH=str(REPO), RMR_CACHE=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = tmp_path / "nodules" / "manifest.csv"
    config = [
        "--config",
        "configs/natural/lesion_ct.yaml",
        "--config",
        "configs/natural/lesion_manifest.yaml",
        f"--data.init_args.manifest={manifest}",
    ]
    cli = cli_main(
        [
            *config,
            *tiny_model(tiny_lesion_artifact),
            "--data.init_args.split.val_fraction=0.25",
            "--data.init_args.split.test_fraction=0.25",
            "--data.init_args.loader.batch_size=2",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'run'}",
        ],
        run=False,
    )
    dm = cli.datamodule
    assert isinstance(dm, ManifestDataModule) and cli.model.region_names == dm.region_names == ["lesion"]

    # the file path sees the phantom's voxels (same lung window), centred on the ROI to within one voxel
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    phantoms = LesionCTDataModule(split={"train_pool": 8, "num_val": 0, "num_test": 0}, cache_dir=str(tmp_path))
    phantoms.setup()
    volumes = _LesionSubjects(phantoms.cohort, list(range(8)), phantoms.intensity())
    for k, sid in enumerate(batch.subject_ids):
        i = int(sid.split("-")[1])
        subject = volumes[i]
        image = subject["image"].data[0]
        centre = torch.nonzero(subject["sampling_map"].data[0]).float().mean(0).round().long()
        errors = []
        for shift in itertools.product((-1, 0, 1), repeat=3):
            x, y, z = (centre - 16 + torch.tensor(shift)).tolist()
            errors.append(float((image[x : x + 32, y : y + 32, z : z + 32] - batch.image[k, 0]).abs().max()))
        assert min(errors) == 0.0, sid
        assert torch.allclose(batch.target[k], phantoms.cohort["target"][i], rtol=1e-5)
        assert torch.allclose(batch.covariates[k], phantoms.cohort["covariates"][i], rtol=1e-5)

    cli.trainer.fit(cli.model, datamodule=dm)
    assert cli.trainer.global_step == 2
    cli.trainer.predict(cli.model, datamodule=dm)
    frame = pd.read_csv(tmp_path / "run" / "predictions" / "predictions.csv")
    assert sorted(frame["subject_id"]) == [f"nodule-{i:04d}" for i in range(8)]
    assert {"horizon", "lesion_baseline", "lesion_followup", "lesion_vdt_days", "lesion_suspicious"} <= set(
        frame.columns
    )
