"""The natural stage: frozen weights stay bit-identical, variants train what they claim, pooling is exact."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.brain_phantom import BrainPhantomDataModule
from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.centring import RegionCentring
from rmr_lightning.encoders import RegionCNN, pool_regions, region_moments, soft_histogram
from rmr_lightning.finetuning import NaturalFinetuning
from rmr_lightning.natural import POLICIES, target_statistics


@pytest.fixture(scope="module")
def phantoms() -> BrainPhantomDataModule:
    """A tiny cohort at 8 mm (grid ~20 x 25 x 22), rendered once per module."""
    dm = BrainPhantomDataModule(
        spacing=8, split={"train_pool": 6, "train_size": 4, "num_val": 2, "num_test": 2}, loader={"batch_size": 2}
    )
    dm.prepare_data()
    return dm


def _model(
    artifact: Path, variant: str, readout: str = "calibrated", trust: str = "checked", fallback: str = "mlp"
) -> NaturalFinetuning:
    torch.manual_seed(0)
    return NaturalFinetuning(
        processor_artifact=str(artifact),
        variant=variant,
        encoder=RegionCNN(widths=(2, 4, 4), out_channels=4),
        head={"hidden": 8},
        readout={"kind": readout, "trust": trust, "fallback": fallback},
    )


def _trainer(tmp_path: Path, steps: int = 3) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )


def test_frozen_processor_is_bit_identical_after_fit_and_in_eval_mode(
    tiny_artifact: Path, phantoms, tmp_path: Path
) -> None:
    model = _model(tiny_artifact, "rmr")
    reference = load_processor_artifact(tiny_artifact).processor.state_dict()
    encoder_before = {k: v.clone() for k, v in model.model.encoder.state_dict().items()}
    _trainer(tmp_path).fit(model, datamodule=phantoms)
    for key, value in model.model.processor.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert not model.model.processor.training and all(not p.requires_grad for p in model.model.processor.parameters())
    assert any(not torch.equal(v, encoder_before[k]) for k, v in model.model.encoder.state_dict().items())  # f' learned
    configured = model.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in model.model.processor.parameters()}


@pytest.mark.parametrize("variant", sorted(POLICIES))
def test_each_variant_trains_exactly_its_parts(tiny_artifact: Path, variant: str) -> None:
    model = _model(tiny_artifact, variant)
    policy = POLICIES[variant]
    trains_p = any(p.requires_grad for p in model.model.processor.parameters())
    assert trains_p == policy.trainable
    artifact = load_processor_artifact(tiny_artifact)
    same = all(
        torch.equal(v, artifact.processor.state_dict().get(k, torch.empty(0)))
        for k, v in model.model.processor.state_dict().items()
    )
    assert same == policy.pretrained
    assert type(model.model.processor).__name__ == ("MLPProcessor" if policy.graph_free else "MPNNProcessor")
    assert all(p.requires_grad == policy.trainable for p in model.model.decoder.parameters())


def test_training_statistics_are_measured_once_and_restored(tiny_artifact: Path, phantoms, tmp_path: Path) -> None:
    model = _model(tiny_artifact, "rmr")
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(model, datamodule=phantoms)
    targets, covariates = phantoms.train_table()
    assert bool(model.model.stats_ready)
    assert torch.allclose(model.model.covariate_mean, covariates.mean(0))
    change = targets[..., 1] - targets[..., 0]
    assert torch.allclose(model.model.target_mean[:, 2], torch.nanmean(change, 0).nan_to_num(0.0), atol=1e-6)


def test_follow_up_only_targets_start_from_their_training_mean_in_their_own_units() -> None:
    """A manifest without baseline columns (regional volumes in mm^3): the baseline and the change must not
    start at 0 with a spread of 1, which left predictions near g's state (~0.05) and 8x worse than the mean."""
    followup = 3000.0 + 500.0 * torch.randn(40, 84, generator=torch.Generator().manual_seed(0))
    targets = torch.stack([torch.full_like(followup, float("nan")), followup], dim=-1)  # (n, R, 2)
    mean, std = target_statistics(targets)
    assert torch.allclose(mean[:, 0], followup.mean(0)) and torch.allclose(mean[:, 1], followup.mean(0))
    assert torch.equal(mean[:, 2], torch.zeros(84))
    assert torch.allclose(std, std[1].expand(3)) and 450 < float(std[1]) < 550
    # with baselines, nothing is borrowed: the change has its own mean and spread
    targets[..., 0] = followup - 30.0 + torch.randn_like(followup)
    mean, std = target_statistics(targets)
    assert torch.allclose(mean[:, 2], torch.full((84,), 30.0), atol=0.5) and float(std[2]) < 2 < float(std[1])


def test_predictions_and_readout_shapes(tiny_artifact: Path, phantoms) -> None:
    model = _model(tiny_artifact, "rmr").eval()
    phantoms.setup("fit")
    batch = next(iter(phantoms.val_dataloader()))
    out = model(batch)
    assert out["prediction"].shape == (2, 84, 2) and out["readout"].shape == (2, 84)
    preds = model.predict_step(batch, 0)
    assert preds["followup"].shape == (2, 84) and len(preds["subject_ids"]) == 2


def test_residual_readout_starts_as_the_calibrated_one_and_then_learns_its_correction(
    tiny_artifact: Path, phantoms, tmp_path: Path
) -> None:
    phantoms.setup("fit")
    batch = next(iter(phantoms.val_dataloader()))
    calibrated, residual = _model(tiny_artifact, "rmr").eval(), _model(tiny_artifact, "rmr", readout="residual").eval()
    assert torch.equal(calibrated(batch)["prediction"], residual(batch)["prediction"])
    _trainer(tmp_path, steps=2).fit(residual.train(), datamodule=phantoms)
    assert residual.model.latent_decoder.weight.abs().sum() > 0


def test_horizon_beyond_pretraining_is_refused(tiny_artifact: Path, phantoms) -> None:
    model = _model(tiny_artifact, "rmr")
    phantoms.setup("fit")
    batch = next(iter(phantoms.val_dataloader()))
    batch.covariates[:, 1] = 99.0
    with pytest.raises(ValueError, match=rf"subject\(s\) {batch.subject_ids[0]} \(99.00\), .*outside \[0, 4.0\]"):
        model(batch)
    batch.covariates[:, 1] = -2.0  # a negative time has no meaning for A
    with pytest.raises(ValueError, match=r"\(-2.00\)"):
        model(batch)


def test_unknown_variant_lists_the_choices(tiny_artifact: Path) -> None:
    with pytest.raises(ValueError, match="baseline.*random_p.*rmr"):
        NaturalFinetuning(processor_artifact=str(tiny_artifact), variant="magic")


def test_pool_regions_equals_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 5, 6, 4, generator=gen)
    labels = torch.randint(0, 5, (2, 1, 5, 6, 4), generator=gen)
    labels[1][labels[1] == 3] = 0  # region 3 absent in subject 1
    pooled, counts = pool_regions(feats, labels, 4)
    for b in range(2):
        for r in range(1, 5):
            mask = labels[b, 0] == r
            assert counts[b, r - 1] == mask.sum()
            expected = feats[b][:, mask].mean(1) if mask.any() else torch.zeros(3)
            assert torch.allclose(pooled[b, r - 1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="0..4"):
        pool_regions(feats, labels + 5, 4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_regions_reads_channels_last_features(channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 5, 6, 4, generator=gen)
    labels = torch.randint(0, 5, (2, 1, 5, 6, 4), generator=gen)
    layout = feats.contiguous(memory_format=torch.channels_last_3d) if channels_last else feats
    assert torch.allclose(pool_regions(layout, labels, 4)[0], pool_regions(feats.clone(), labels, 4)[0], atol=1e-6)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_region_moments_are_the_mean_and_mean_square_per_region(requires_grad: bool) -> None:
    """The bincount path (no gradient) and the differentiable fallback agree with a loop over regions."""
    gen = torch.Generator().manual_seed(2)
    image = (3.0 + torch.randn(2, 1, 6, 5, 4, generator=gen)).requires_grad_(requires_grad)
    labels = torch.randint(0, 4, (2, 1, 6, 5, 4), generator=gen)
    labels[0][labels[0] == 2] = 0  # region 2 absent in subject 0
    mean, square, counts = region_moments(image, labels, 3)
    assert mean.shape == square.shape == (2, 3, 1) and mean.requires_grad == requires_grad
    for b in range(2):
        for r in range(1, 4):
            values = image.detach()[b, 0][labels[b, 0] == r]
            assert counts[b, r - 1] == values.numel()
            assert torch.allclose(mean[b, r - 1, 0], values.mean() if values.numel() else torch.tensor(0.0), atol=1e-5)
            assert torch.allclose(
                square[b, r - 1, 0], (values**2).mean() if values.numel() else torch.tensor(0.0), atol=1e-4
            )


def test_region_histogram_counts_the_share_of_voxels_in_each_band() -> None:
    """Intensities at bin centres fall into one bin; between two centres they split linearly; outside, the end bin."""
    image = torch.tensor([0.0, 0.0, 0.5, 1.0, 0.25, 1.7]).view(1, 1, 6, 1, 1)
    labels = torch.tensor([1, 1, 1, 1, 2, 2]).view(1, 1, 6, 1, 1)
    shares, _ = pool_regions(soft_histogram(image, 3, (0.0, 1.0)), labels, 2)  # bins at 0, 0.5, 1
    assert torch.allclose(shares[0, 0], torch.tensor([0.5, 0.25, 0.25]))
    assert torch.allclose(shares[0, 1], torch.tensor([0.25, 0.25, 0.5]))  # 0.25 halfway; 1.7 clamps to the last bin
    cnn = RegionCNN(widths=(2, 2, 2), out_channels=3, histogram_bins=4)
    assert cnn.fuse.in_features == (2 + 4) + 6
    with pytest.raises(ValueError, match="histogram_bins"):
        RegionCNN(histogram_bins=1)


def test_region_centring_removes_each_regions_mean_but_keeps_their_relative_spread() -> None:
    """Per-region means go, one scale for all regions: region 0 varies 10x more than region 1 and still does
    (per-region BatchNorm would give both unit variance); absent regions stay out of the statistics."""
    gen = torch.Generator().manual_seed(3)
    offsets = torch.tensor([5.0, -2.0, 0.5]).view(1, 3, 1)
    spread = torch.tensor([1.0, 0.1, 0.5]).view(1, 3, 1)
    x = offsets + spread * torch.randn(64, 3, 2, generator=gen)  # (B, R, C)
    present = torch.ones(64, 3, 1)
    present[:32, 2] = 0
    x[:32, 2] = 100.0  # garbage where the region is absent
    centring = RegionCentring(num_regions=3, channels=2).train()
    out = centring(x, present)
    assert torch.allclose(out[:, :2].mean(0), torch.zeros(2, 2), atol=1e-5)
    assert torch.allclose(out[32:, 2].mean(0), torch.zeros(2), atol=1e-5) and torch.equal(
        out[:32, 2], torch.zeros(32, 2)
    )
    ratio = out[:, 0].std(0) / out[:, 1].std(0)
    assert torch.allclose(ratio, x[:, 0].std(0) / x[:, 1].std(0), rtol=1e-4) and bool((ratio > 5).all())
    expected_var = ((x[:, :2] - x[:, :2].mean(0)) ** 2).sum((0, 1)) + ((x[32:, 2] - x[32:, 2].mean(0)) ** 2).sum(0)
    expected_var = expected_var / (64 * 2 + 32)
    assert torch.allclose(out[:, 0], (x[:, 0] - x[:, 0].mean(0)) / (expected_var + 1e-5).sqrt(), atol=1e-4)


def test_region_centring_in_eval_uses_running_statistics_not_the_batch() -> None:
    gen = torch.Generator().manual_seed(4)
    centring = RegionCentring(num_regions=2, channels=1, momentum=0.5).train()
    data = torch.tensor([3.0, -1.0]).view(1, 2, 1) + 0.1 * torch.randn(16, 2, 1, generator=gen)
    for _ in range(30):
        centring(data, torch.ones(16, 2, 1))
    assert torch.allclose(centring.running_mean, data.mean(0), atol=1e-5)
    centring.eval()
    one = data[:1]
    alone = centring(one, torch.ones(1, 2, 1))
    with_others = centring(torch.cat([one, data[5:9] + 50.0]), torch.ones(5, 2, 1))[:1]
    assert torch.equal(alone, with_others)


def test_a_poorly_pretrained_frozen_processor_is_warned_about(tiny_artifact: Path, tmp_path: Path) -> None:
    """The tiny artifact's recorded validation R^2 is set low and high: only the low one warns, and only when frozen."""
    payload = torch.load(tiny_artifact, weights_only=True)
    for r2, variant, warns in ((0.8, "rmr", True), (0.8, "unfrozen", False), (0.999, "rmr", False)):
        path = tmp_path / f"p_{r2}_{variant}.pt"
        torch.save({**payload, "metrics": {**payload["metrics"], "val_r2_delta": r2}}, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _model(path, variant)
        assert any("validation R^2 of the change of only" in str(w.message) for w in caught) == warns, (r2, variant)


def test_cohort_parameters_and_gains_get_their_own_learning_rates(tiny_artifact: Path) -> None:
    torch.manual_seed(0)
    model = NaturalFinetuning(
        processor_artifact=str(tiny_artifact),
        encoder=RegionCNN(widths=(2, 4, 4), out_channels=4),
        lr_factors={"cohort": 10.0, "gain": 30.0},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs[id(model.model.cohort_logits)] == pytest.approx(1e-2)
    assert lrs[id(model.model.log_gain)] == pytest.approx(3e-2)
    assert lrs[id(model.model.encoder.fuse.weight)] == pytest.approx(1e-3)


@pytest.mark.parametrize("variant", ["rmr", "random_p"])
def test_fit_reports_how_well_p_explains_the_training_changes(
    tiny_artifact: Path, phantoms, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The P check runs once at the start of fit, on the console and in the logger; a variant whose P is
    not the artifact's is not checked."""
    import pandas as pd
    from lightning.pytorch.loggers import CSVLogger

    from rmr_lightning.processor_check import check_processor

    model = _model(tiny_artifact, variant)
    trainer = _trainer(tmp_path, steps=1)
    trainer.loggers = [CSVLogger(tmp_path, name="csv")]
    printed: list[str] = []  # what rank_zero_info puts on the console (Lightning's logger may not propagate)
    monkeypatch.setattr("rmr_lightning.finetuning.rank_zero_info", printed.append)
    trainer.fit(model, datamodule=phantoms)
    logged = pd.read_csv(Path(trainer.loggers[0].log_dir) / "metrics.csv")
    if variant == "random_p":
        assert model.processor_check is None and "p_check/r2" not in logged
        return
    expected = check_processor(model.model, *phantoms.train_table())
    assert model.processor_check == expected and -1.0 <= expected.r2 <= 1.0
    assert logged["p_check/r2"].dropna().tolist() == pytest.approx([expected.r2])
    assert any(f"P explains R^2 = {expected.r2:.3f}" in line for line in printed)


def test_trusted_p_predicts_bit_identically_and_untrusted_p_is_not_heard(tiny_artifact: Path, phantoms) -> None:
    """At trust 1 the fallback changes nothing, not even a random draw; at trust 0 the change is the
    fallback's alone, whatever P computes."""
    phantoms.setup("fit")
    batch = next(iter(phantoms.val_dataloader()))
    full, after_full = _model(tiny_artifact, "rmr", trust="full").eval(), torch.randn(3)
    checked, after_checked = _model(tiny_artifact, "rmr").eval(), torch.randn(3)
    assert full.model.fallback is None and checked.model.fallback is not None
    assert torch.equal(after_full, after_checked)  # the global random state is left as it was
    assert torch.equal(full(batch)["prediction"], checked(batch)["prediction"])
    assert not checked.model.fallback_active  # trusted P: the fallback is neither run nor trained
    assert not any(param.requires_grad for param in checked.model.fallback.parameters())
    checked.model.set_trust(0.0)
    before = checked(batch)["prediction"]
    with torch.no_grad():
        for param in checked.model.processor.parameters():
            param.add_(torch.randn_like(param))
    assert torch.equal(checked(batch)["prediction"], before)
    assert not torch.equal(full(batch)["prediction"], before)
    assert _model(tiny_artifact, "unfrozen").model.fallback is None  # P that learns needs no fallback


@pytest.mark.parametrize("trust", [0.0, 1.0])
def test_the_fit_trains_the_fallback_only_below_full_trust(
    trust: float, tiny_artifact: Path, phantoms, tmp_path: Path, monkeypatch
) -> None:
    """The P check runs before the optimiser is built: below trust 1 the fallback is in it and learns; at 1
    it is frozen, left out and not run. A checkpoint restores the setting with the trust."""
    import rmr_lightning.finetuning as finetuning

    monkeypatch.setattr(finetuning, "trust_from_r2", lambda r2: trust)
    model = _model(tiny_artifact, "rmr")
    before = {k: v.clone() for k, v in model.model.fallback.state_dict().items()}
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(model, datamodule=phantoms)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    in_optimiser = {id(p) in optimised for p in model.model.fallback.parameters()}
    moved = any(not torch.equal(before[k], v) for k, v in model.model.fallback.state_dict().items())
    assert float(model.model.trust) == trust and model.model.fallback_active == (trust < 1)
    assert in_optimiser == {trust < 1} and moved == (trust < 1)
    trainer.save_checkpoint(tmp_path / "trust.ckpt")
    loaded = _model(tiny_artifact, "rmr")
    loaded.load_state_dict(torch.load(tmp_path / "trust.ckpt", weights_only=True)["state_dict"])
    assert loaded.model.fallback_active == (trust < 1)


def test_graph_fallback_is_a_fresh_p_on_the_connectome_and_the_mlp_one_is_node_wise(tiny_artifact: Path) -> None:
    """``readout.fallback``: ``graph`` is ``scratch``'s path (P's architecture, fresh weights), so one
    region's change follows its neighbours' states; ``mlp`` is ``baseline``'s, blind to them."""
    changes = {}
    for kind in ("mlp", "graph"):
        model = _model(tiny_artifact, "rmr", fallback=kind).model
        fallback, processor = model.fallback, model.processor
        # below trust 1 all of the fallback learns, though it is copied from the frozen artifact's f, P and g
        model.set_trust(0.5)
        assert all(param.requires_grad for param in fallback.parameters()) and fallback.training
        if kind == "graph":
            assert type(fallback.processor) is type(processor)
            assert not torch.equal(next(fallback.processor.parameters()), next(processor.parameters()))
        params = torch.full((1, model.param_scale.numel()), 0.5)
        state = torch.full((1, model.num_regions), 0.1)
        moved = state.clone()
        neighbour = int(model.edge_index[1, model.edge_index[0] == 0][0])  # a region with an edge to region 0
        moved[0, neighbour] = 0.9
        with torch.no_grad():
            graph = model.batched_graph(1)
            before = fallback.change(model.abstract_inputs(state, params), **graph)[0]
            after = fallback.change(model.abstract_inputs(moved, params), **graph)[0]
        changes[kind] = float((after - before).abs().max())  # region 0's change when a neighbour moves
    assert changes["mlp"] == 0.0 and changes["graph"] > 1e-6
    with pytest.raises(ValueError, match="readout.fallback"):
        _model(tiny_artifact, "rmr", fallback="gnn")


class _FixedEncoder(torch.nn.Module):
    """Encoder stand-in: the same features for every region, and voxel counts given per test."""

    out_channels = 3

    def __init__(self, counts: torch.Tensor) -> None:
        super().__init__()
        self.counts = counts

    def forward(self, image, labels, num_regions):
        return torch.ones(len(self.counts), num_regions, 3), self.counts


@pytest.mark.parametrize("region_volume", [False, True])
def test_region_volume_lets_the_state_follow_a_regions_size(tiny_artifact: Path, region_volume: bool) -> None:
    """With head.region_volume the state head sees each region's voxel count (log), so a shrunken region
    reads differently; without it only the region's presence is seen."""
    from rmr_lightning.data.batches import ScanBatch
    from rmr_lightning.natural import NaturalModel, StateHeadConfig

    counts = torch.full((2, 84), 40.0)
    counts[1, 5] = 10.0  # region 6 of the second subject has lost three quarters of its voxels
    torch.manual_seed(0)
    head = StateHeadConfig(region_centring=False, region_volume=region_volume)
    model = NaturalModel(load_processor_artifact(tiny_artifact), "rmr", _FixedEncoder(counts), head=head).eval()
    batch = ScanBatch(
        image=torch.zeros(2, 1, 2, 2, 2),
        labels=torch.zeros(2, 1, 2, 2, 2, dtype=torch.long),
        covariates=torch.tensor([[70.0, 2.0], [70.0, 2.0]]),
        target=torch.zeros(2, 84, 2),
        state=torch.zeros(2, 84),
        subject_ids=["a", "b"],
    )
    state = model.encode(batch)[1]  # (2, 84)
    moved = (state[1] - state[0]).abs()
    if region_volume:  # the shrunken region moves most; the others a little, through the subject's mean feature
        others = torch.arange(84) != 5
        assert moved[5] > 0 and moved[5] > 10 * moved[others].max()
    else:
        assert torch.equal(state[0], state[1])
