"""Two CPU processes (gloo): ranks see disjoint subjects, metrics sync, rank 0 alone writes artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_PRETRAIN, ddp_fit_with_probe, rmr, tiny_manifest, tiny_natural

DDP = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.strategy=ddp",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_natural_ddp_ranks_see_disjoint_subjects(tiny_artifact: Path, tmp_path: Path) -> None:
    config = ["--config", "configs/natural/brain_mri.yaml", *tiny_natural(tiny_artifact)]
    ddp_fit_with_probe([*config, "--data.init_args.loader.batch_size=1"], tmp_path)
    for epoch in (0, 1):
        ranks = [json.loads((tmp_path / "seen" / f"rank{r}_epoch{epoch}.json").read_text()) for r in (0, 1)]
        assert all(r["world_size"] == 2 for r in ranks)
        a, b = (set(r["subjects"]) for r in ranks)
        assert a and b and not a & b, (a, b)  # disjoint
        assert len(a | b) == 4  # together they cover the training set


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_manifest_ddp_preprocesses_each_scan_once_and_each_rank_reads_only_its_shard(
    phantom_manifest: Path, tiny_artifact: Path, tmp_path: Path
) -> None:
    """Two ranks on a manifest of scans with an empty cache: each scan enters the cache once (rank 0 checks
    and preprocesses the data before the other rank starts), and each rank reads only its own training shard."""
    config = ["--config", "configs/natural/manifest.yaml", *tiny_manifest(phantom_manifest, tiny_artifact)]
    extra = [f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--data.init_args.loader.batch_size=1"]
    ddp_fit_with_probe([*config, *extra], tmp_path, probe="RecordScanReads")
    seen = tmp_path / "seen"
    builds = [json.loads((seen / f"rank{r}_epoch1_reads.json").read_text())["builds"] for r in (0, 1)]
    assert sorted(builds[0] + builds[1]) == sorted(p.name for p in phantom_manifest.parent.glob("*_T1w.nii.gz"))
    assert builds[1] == []  # the second rank found every scan in the cache
    for epoch in (0, 1):
        trained = [set(json.loads((seen / f"rank{r}_epoch{epoch}.json").read_text())["subjects"]) for r in (0, 1)]
        reads = [json.loads((seen / f"rank{r}_epoch{epoch}_reads.json").read_text())["reads"] for r in (0, 1)]
        assert trained[0] and trained[1] and not trained[0] & trained[1] and len(trained[0] | trained[1]) == 4
        assert [sorted(r) for r in reads] == [sorted(t) for t in trained]  # one read per subject, of its shard


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
def test_pretraining_ddp_completes_and_rank_zero_writes_the_artifact(tmp_path: Path) -> None:
    callbacks = [
        {"class_path": "rmr_lightning.callbacks.PretrainingArtifacts", "init_args": {"dirpath": str(tmp_path)}}
    ]
    args = [
        "fit",
        "--config",
        "configs/pretrain/ndm.yaml",
        *TINY_PRETRAIN,
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        *DDP,
    ]
    result = rmr(args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "processor.pt").is_file()
    curve = (tmp_path / "val_curve.csv").read_text().splitlines()
    assert curve[0] == "step,seconds,train_seconds,val_r2_delta" and len(curve) == 3  # one writer, two validations


def _centring_rank(rank: int, init_file: str, x: torch.Tensor, present: torch.Tensor, out_dir: str, first: int) -> None:
    """One of two processes: its share of the batch (rank 0 the first ``first`` subjects) through
    RegionCentring, outputs and gradients saved."""
    from datetime import timedelta

    import torch

    from rmr_lightning.centring import RegionCentring

    # a collective one rank skips would hang; fail within a minute instead
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        half = slice(0, first) if rank == 0 else slice(first, len(x))
        xs = x[half].clone().requires_grad_(True)
        centring = RegionCentring(num_regions=x.shape[1], channels=x.shape[2]).train()
        out = centring(xs, present[half])
        (out.pow(3) * present[half]).sum().backward()  # a loss whose gradient depends on the statistics
        torch.save(
            {"out": out.detach(), "grad": xs.grad, "mean": centring.running_mean, "var": centring.running_var},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("first", [3, 1])
def test_region_centring_uses_the_global_batch_across_processes(tmp_path: Path, first: int) -> None:
    """Two ranks with parts of a batch give the outputs, input gradients and running statistics of one
    process with the whole batch (a per-rank mean would centre each part on itself; a rank with one
    subject must still join the reductions)."""
    import torch
    import torch.multiprocessing as mp

    from rmr_lightning.centring import RegionCentring

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, generator=gen) + torch.arange(6.0).view(6, 1, 1)  # halves differ in mean
    present = (torch.rand(6, 4, 1, generator=gen) > 0.2).float()
    present[:3, 0] = 0  # region 0 only on the second rank
    mp.spawn(_centring_rank, args=(str(tmp_path / "init"), x, present, str(tmp_path), first), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]

    whole = x.clone().requires_grad_(True)
    centring = RegionCentring(num_regions=4, channels=3).train()
    out = centring(whole, present)
    (out.pow(3) * present).sum().backward()
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]), whole.grad, atol=1e-4)
    for r in ranks:
        assert torch.allclose(r["mean"], centring.running_mean, atol=1e-6) and torch.allclose(
            r["var"], centring.running_var, atol=1e-6
        )
