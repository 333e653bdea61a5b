"""Stage 2 of RMR: a new scan encoder ``f'`` and decoder ``g'`` around a frozen pretrained ``P``.

Encode: a 3D CNN pools voxel features into one vector per atlas region; a small head maps each region
(with the covariates) to the abstract state ``x'`` the processor was trained on, and the pretrained
linear ``f`` embeds ``[x', cohort parameters, horizon]`` into ``P``'s latent space. Mapping into the
abstract inputs first keeps ``f'(x)`` on the manifold of latents ``P`` saw in pretraining (latent
alignment; RMR, Velickovic et al. 2022, Sec. 3). Process: ``P`` on the connectome. Decode: the
abstract decoder ``g`` reads the state now, ``g(z)``, and after ``P``, ``g(P(z))``; ``g'`` calibrates them
to the targets with positive gains, covariate effects and a per-region offset:
``baseline = mean + a g(z) + ...``, ``change = mean + b (g(P(z)) - g(z)) + ...`` with ``a, b > 0``
starting at one target unit per unit of state, and covariate terms that start at zero, so training
starts from the training mean of every region. The positive gains anchor the sign and
scale of the estimated state, so with a pretrained ``f, P, g`` the estimate must mean what the
algorithm's state means; the readout ``g(f'(x))`` is then interpretable.

Variants (chosen in config) differ only in where ``f``, ``P`` and ``g`` come from and whether they learn:

=========  ======================  =========  ===============================================
variant    f, P, g start from      learn?     what it tests
=========  ======================  =========  ===============================================
rmr        the artifact            no         RMR: the reasoning is already in P
unfrozen   the artifact            yes        does freezing help with few scans?
scratch    random init             yes        the graph prior without the pretraining
random_p   random init             no         a frozen random graph network
baseline   random init, P -> MLP   yes        no processor, same depth and width, no graph
=========  ======================  =========  ===============================================
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection, PearsonCorrCoef, R2Score

from processors.base import Processor
from processors.mlp import MLPProcessor
from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.batches import ScanBatch
from rmr_lightning.connectome import batch_graph, graph_tensors, load_dk84
from rmr_lightning.encoders import RegionCNN
from rmr_lightning.guards import check_gradients, check_loss
from rmr_lightning.optim import configure_optimizers

Variant = Literal["rmr", "baseline", "scratch", "unfrozen", "random_p"]
#: sigmoid(-3) ~ 0.05: the estimated state starts near a typical regional load.
STATE_LOGIT_INIT = -3.0
STATE_INIT = 1.0 / (1.0 + math.exp(-STATE_LOGIT_INIT))
#: Pretraining validation R^2 (of the change) below which a frozen P is warned about: 0.99 helped, 0.81 hurt (docs/results/imperfect_p.md).
MIN_FROZEN_R2 = 0.95


@dataclass(frozen=True)
class VariantPolicy:
    pretrained: bool  # f and P start from the artifact's weights
    trainable: bool  # f and P learn together with f' and g'
    graph_free: bool = False  # P is replaced by a node-wise MLP of the same depth and width


POLICIES: dict[str, VariantPolicy] = {
    "rmr": VariantPolicy(pretrained=True, trainable=False),
    "unfrozen": VariantPolicy(pretrained=True, trainable=True),
    "scratch": VariantPolicy(pretrained=False, trainable=True),
    "random_p": VariantPolicy(pretrained=False, trainable=False),
    "baseline": VariantPolicy(pretrained=False, trainable=True, graph_free=True),
}


def target_statistics(targets: Tensor) -> tuple[Tensor, Tensor]:
    """Training means (R, 3) and spreads (3,) of baseline, follow-up and change from targets (n, R, 2)
    of (baseline, follow-up), NaN where unknown.

    Without baseline values (a manifest of follow-up values only) the baseline takes the follow-up's
    statistics and the change starts at zero, so predictions still start from the training mean in the
    targets' own units (volumes in mm^3 as well as fractions).
    """
    levels = torch.stack([targets[..., 0], targets[..., 1], targets[..., 1] - targets[..., 0]], dim=-1)  # (n, R, 3)
    mean = torch.nanmean(levels, dim=0)
    mean[:, 0] = torch.where(torch.isfinite(mean[:, 0]), mean[:, 0], mean[:, 1])
    mean = mean.nan_to_num(0.0)
    std = torch.sqrt(torch.nanmean((levels - mean).reshape(-1, 3) ** 2, dim=0))
    usable = torch.isfinite(std) & (std > 0)
    fallback = std[1] if bool(usable[1]) else torch.ones_like(std[1])  # the follow-up's spread, else 1
    return mean, torch.where(usable, std, fallback)


def freeze(module: nn.Module) -> nn.Module:
    """The one place parameters are frozen: no gradients, eval mode (kept by ``train()`` below)."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def _reinitialise(module: nn.Module) -> nn.Module:
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return fresh


def _aligned_random_pair(encoder: nn.Linear, decoder: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """Fresh random ``f`` and a ``g`` with ``g(f([x, p])) = x`` exactly: the state read-out anchoring the
    pretrained pair has, given to the variants without pretraining so that only the learned dynamics
    differ. ``g``'s weight is ``f``'s state column made orthogonal to its parameter columns and bias."""
    f, g = _reinitialise(encoder), _reinitialise(decoder)
    with torch.no_grad():
        state_col = f.weight[:, 0]  # (H,)
        others = torch.cat([f.weight[:, 1:], f.bias.unsqueeze(1)], dim=1)  # (H, P + 1)
        basis, _ = torch.linalg.qr(others)
        u = state_col - basis @ (basis.T @ state_col)
        g.weight.copy_((u / (u @ state_col)).unsqueeze(0))
        g.bias.zero_()
    return f, g


def _stage_metrics(stage: str) -> nn.ModuleDict:
    """Metric objects of one stage: of the change (the headline), of the follow-up, of the readout."""
    return nn.ModuleDict(
        {
            "change": MetricCollection({"mae": MeanAbsoluteError(), "r2": R2Score()}, prefix=f"{stage}/"),
            "mae_followup": MeanAbsoluteError(),
            "state_corr": PearsonCorrCoef(),
        }
    )


class RegionCentring(nn.Module):
    """Each region's features as a deviation from that region's mean over the training subjects.

    Atrophy shows as a region looking different from how that region usually looks, and how it
    usually looks (its partial volume of grey matter, white matter and CSF) differs between regions,
    which a head shared by all regions cannot know (normative modelling in neuroimaging compares each
    region with its own reference in the same way). Statistics as in BatchNorm: those of the batch in
    training, running ones in eval; but the mean is kept per region and one scale is shared by all regions,
    so a region that varies little between subjects keeps small deviations instead of having its noise
    blown up to unit variance (per-region BatchNorm did that: better state correlation, worse change MAE).
    Regions absent from a scan (``present`` 0) do not enter the statistics. In a distributed run the
    batch statistics are those of the global batch, summed over the processes (as SyncBatchNorm's, with
    gradients through the sums): one process with the ranks' batches concatenated gives the same, and a
    rank holding two subjects does not centre on a two-subject mean. (B, R, C) -> (B, R, C)
    """

    def __init__(self, num_regions: int, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(num_regions, channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor, present: Tensor) -> Tensor:
        """x (B, R, C) features, present (B, R, 1) in {0, 1}."""
        mean, var = self.running_mean, self.running_var
        if self.training:
            sums = torch.cat([(x * present).sum(0), present.sum(0)], dim=1)  # (R, C + 1)
            subjects = len(x)
            if _distributed():  # the subject count travels in the same reduction, as an extra row
                count = sums.new_zeros(1, sums.shape[1])
                count[0, 0] = len(x)
                sums, count = _sum_over_ranks(torch.cat([sums, count])).split([len(sums), 1])
                subjects = int(count[0, 0])  # the same on every rank, so every rank takes the same branch
            if subjects > 1:  # batch statistics need two subjects
                total, seen = sums[:, :-1], sums[:, -1:]  # (R, C), (R, 1) subjects in which each region is present
                # a region absent from the whole batch keeps its running mean, which lerp then leaves as is
                mean = torch.where(seen > 0, total / seen.clamp_min(1), self.running_mean)
                squares = torch.cat([((x - mean).pow(2) * present).sum((0, 1)), present.sum().reshape(1)])  # (C + 1,)
                squares = _sum_over_ranks(squares)
                var = squares[:-1] / squares[-1].clamp_min(1)  # (C,) pooled over regions
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_var.lerp_(var, self.momentum)
        return (x - mean) * present / (var + self.eps).sqrt()


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over the processes of a distributed run, differentiably; ``t`` itself in one process."""
    return _AllReduceSum.apply(t) if _distributed() else t


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients of every rank's loss (the gradient of the sum of
    all ranks' losses with respect to each rank's input, as SyncBatchNorm computes it)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


class FrozenProcessorFinetuning(L.LightningModule):
    """``g'(P(f'(x)))`` for regional baseline and follow-up values from a baseline scan.

    Args:
        processor_artifact: ``processor.pt`` written by pretraining (``make pretrain``).
        variant: one of ``rmr``, ``baseline``, ``scratch``, ``unfrozen``, ``random_p`` (table above).
        encoder: region encoder, ``(image, labels, R) -> (features (B, R, C), counts (B, R))`` with an
            ``out_channels`` attribute (default ``RegionCNN()``).
        covariate_names: names of the batch's covariate columns (linked from the datamodule).
        time_covariate: the covariate that is the algorithm's time parameter (years to follow-up).
        head_hidden: width of the per-region head that maps pooled features to the abstract state.
        region_centring: give the head each region's features also as a deviation from that region's
            mean over the training subjects (``RegionCentring``); 6 mm MRI, n=8, 6 seeds: test MAE of the
            change 0.0056 -> 0.0048 for ``rmr`` (docs/results/demo_mri.md).
        readout: ``calibrated`` (g reads the state now and after P; positive gains map it to the targets)
            or ``linear`` (a free linear map of ``[z, P(z)]``, as in the RMR paper; no anchoring), or
            ``residual`` (calibrated plus a zero-initialised linear map of ``[z, P(z)]``).
        change_from_mean: the calibrated change starts from the training mean change plus ``P``'s change
            (brain: most of the change is ageing and the mean carries it), or from ``P``'s change alone
            (lesions: growth is all of it, and a mean added on top must be unlearned; 1 mm lesion study, n=64).
        change_weight: weight of the loss on the change (follow-up minus baseline), the headline.
        log_ratio_weight: weight of a loss on ``log(follow-up / baseline)`` where both are positive (0: off).
            For growth the log ratio sets the doubling time, ``t ln 2 / ln(V1 / V0)``; the losses above weigh
            it by size, so small fast-growing nodules count little. Dimensionless, of order 1: no scaling.
        abstract_lr_factor: learning-rate factor for ``f``, ``P`` and ``g`` when they learn. Adam moves every
            weight by about the learning rate, so a 128-wide linear ``g`` would move its read-out by ~0.2
            per step at the encoder's rate and lose the state's alignment within a few steps.
        cohort_lr_factor: learning-rate factor for the cohort's parameters of A (e.g. gamma), which move
            from mid-range only as fast as the shared learning rate lets them.
        connectome: the graph ``P`` runs on: ``dk84`` (the shipped connectome; label r is region r) or
            ``isolated`` (``len(region_names)`` nodes without edges, e.g. one lesion per scan).
        region_names: names of the regions of an ``isolated`` graph (default one region, ``lesion``).
        subject_params: parameters of ``A`` that differ between subjects and are estimated from each scan
            (a head on the subject's pooled features, kept inside the pretraining range); the others are
            cohort constants (learned) or the time covariate. Lesions: ``[r]``, whose growth rate follows
            the nodule type that the scan's density shows.
        state_init: the estimated abstract state every region starts from (a typical state: 0.05 for brain
            regions, most of which are healthy; about 0.3 for lesions).
        state_unit: target units per unit of the abstract state, where they differ (lesions: the state is
            the volume relative to a 20 mm sphere and targets are in mL, so 4.19); the readout's gains start there.
        gain_lr_factor: learning-rate factor for the readout's two log-gains. Adam moves a log-gain by about
            the learning rate per step, so under cosine decay it travels at most ~``lr * steps / 2`` (0.6 in the
            demo at factor 1): too little to turn down a P whose change is noise (``random_p``). 10 had the
            lowest validation error for every trained variant of the 6 mm demo among 1, 10 and 100 (docs/results/demo_mri.md).
        optimizer, lr_scheduler: injected callables.
    """

    def __init__(
        self,
        processor_artifact: str = "results/pretrain/processor.pt",
        variant: Variant = "rmr",
        encoder: nn.Module | None = None,
        covariate_names: list[str] | None = None,
        time_covariate: str = "horizon",
        head_hidden: int = 32,
        region_centring: bool = True,
        readout: Literal["calibrated", "linear", "residual"] = "calibrated",
        change_weight: float = 1.0,
        log_ratio_weight: float = 0.0,
        change_from_mean: bool = True,
        abstract_lr_factor: float = 0.1,
        cohort_lr_factor: float = 1.0,
        gain_lr_factor: float = 10.0,
        connectome: Literal["dk84", "isolated"] = "dk84",
        region_names: list[str] | None = None,
        subject_params: list[str] | None = None,
        state_init: float = STATE_INIT,
        state_unit: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if variant not in POLICIES:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(POLICIES)}")
        if readout not in ("calibrated", "linear", "residual"):
            raise ValueError(f"readout must be 'calibrated', 'linear' or 'residual', got {readout!r}")
        # Under LightningCLI the encoder is saved as its class_path/init_args, so load_from_checkpoint rebuilds
        # a non-default f'; a module passed from Python has no such config and is left out.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if isinstance(self.hparams.get("encoder"), nn.Module):
            self.hparams.pop("encoder")
        covariate_names = list(covariate_names or ["age", "horizon"])
        if time_covariate not in covariate_names:
            raise ValueError(f"time_covariate {time_covariate!r} is not among the covariates {covariate_names}")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        policy = POLICIES[variant]

        artifact = load_processor_artifact(processor_artifact)
        self.artifact_sha256 = artifact.sha256
        r2 = artifact.metrics.get("val_r2_delta")
        if policy.pretrained and not policy.trainable and r2 is not None and r2 < MIN_FROZEN_R2:
            rank_zero_warn(
                f"{processor_artifact}: P reached a validation R^2 of the change of only {r2:.3f} in pretraining. "
                f"Frozen Ps below ~{MIN_FROZEN_R2} made rmr worse than baseline in our measurements "
                "(docs/results/imperfect_p.md); pretrain longer, or use readout=residual or variant=unfrozen"
            )
        spec = artifact.abstract_spec
        self.param_names: list[str] = list(spec["param_names"])
        self.max_time: float | None = spec.get("max_time")
        self.pretrained_algorithm = str(spec.get("algorithm", "")).split("(")[0]  # class name of the A that P emulates
        self.time_index = self.param_names.index(spec["time_param"])
        self.covariate_names = covariate_names
        self.time_covariate_index = covariate_names.index(time_covariate)
        self.register_buffer("param_scale", torch.tensor(spec["param_scale"], dtype=torch.float32), persistent=False)

        if connectome == "dk84":
            conn, self.region_names = load_dk84()
        elif connectome == "isolated":
            self.region_names = list(region_names or ["lesion"])
            conn = torch.zeros(len(self.region_names), len(self.region_names), dtype=torch.float64)
        else:
            raise ValueError(f"connectome must be 'dk84' or 'isolated', got {connectome!r}")
        self.subject_params = list(subject_params or [])
        unknown = [p for p in self.subject_params if p not in self.param_names or p == spec["time_param"]]
        if unknown:
            raise ValueError(f"subject_params {unknown} are not parameters of A other than time: {self.param_names}")
        self.subject_param_index = [self.param_names.index(p) for p in self.subject_params]
        edge_index, edge_weight = graph_tensors(conn)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.register_buffer("edge_weight", edge_weight, persistent=False)
        self.num_regions = conn.shape[0]
        hidden = artifact.processor.hidden_dim

        # ---- f': CNN -> regional features -> abstract state -> (pretrained) linear f -> latent
        self.encoder = encoder if encoder is not None else RegionCNN()
        channels = int(self.encoder.out_channels)
        num_cov = len(covariate_names)
        self.region_centring = RegionCentring(self.num_regions, channels) if region_centring else None
        # head input per region: its features, the subject's mean feature (contrast, scanner), presence, covariates
        head_in = (3 if region_centring else 2) * channels + 1 + num_cov
        self.state_head = nn.Sequential(nn.Linear(head_in, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1))
        # regions differ in partial volume; the offset starts the estimate near 0 (most regions are healthy)
        if not 0.0 < state_init < 1.0:
            raise ValueError(f"state_init must lie in (0, 1), got {state_init}")
        self.state_init = float(state_init)
        self.state_bias = nn.Parameter(torch.full((self.num_regions,), math.log(state_init / (1.0 - state_init))))
        # per-subject parameters of A from the subject's mean feature and covariates, starting mid-range
        self.param_head = None
        if self.subject_params:
            self.param_head = nn.Sequential(
                nn.Linear(channels + num_cov, head_hidden), nn.ReLU(), nn.Linear(head_hidden, len(self.subject_params))
            )
            nn.init.zeros_(self.param_head[-1].weight)
            nn.init.zeros_(self.param_head[-1].bias)
        # Cohort-level parameters of A other than time (e.g. gamma): learned, but kept inside the range P
        # was pretrained on (low + (high - low) * sigmoid), starting mid-range.
        self.cohort_logits = nn.Parameter(torch.zeros(len(self.param_names)))
        ranges = spec.get("param_ranges") or [[0.0, s] for s in spec["param_scale"]]
        self.register_buffer("param_low", torch.tensor([r[0] for r in ranges], dtype=torch.float32), persistent=False)
        self.register_buffer("param_high", torch.tensor([r[1] for r in ranges], dtype=torch.float32), persistent=False)
        if policy.pretrained:
            self.abstract_encoder, decoder = artifact.encoder, artifact.decoder
        else:
            self.abstract_encoder, decoder = _aligned_random_pair(artifact.encoder, artifact.decoder)

        # ---- P
        if policy.graph_free:
            self.processor: Processor = MLPProcessor(hidden, num_layers=artifact.processor.num_layers)
        else:
            self.processor = artifact.processor if policy.pretrained else _reinitialise(artifact.processor)

        # ---- g': the abstract decoder g reads the state now, g(z), and after P, g(P(z)); a calibration
        # with positive gains maps them to (baseline, change) in units standardised on the training set
        self.decoder = decoder
        # gains exp(log_gain) > 0 start at ``state_unit`` target units per unit of state: the sign of the state is anchored
        if state_unit <= 0:
            raise ValueError(f"state_unit must be positive, got {state_unit}")
        self.log_gain = nn.Parameter(torch.full((2,), math.log(state_unit)))
        self.covariate_decoder = nn.Linear(num_cov, 2)
        nn.init.zeros_(self.covariate_decoder.weight)  # start from the training mean of every region
        nn.init.zeros_(self.covariate_decoder.bias)
        self.region_bias = nn.Parameter(torch.zeros(self.num_regions, 2))
        # readout "linear": a free linear map of [z, P(z)] instead of the calibrated g (no anchoring);
        # "residual": the calibrated readout plus such a map, starting at zero, to correct an imperfect P
        self.latent_decoder = nn.Linear(2 * hidden, 2) if readout != "calibrated" else None
        if readout == "residual":
            nn.init.zeros_(self.latent_decoder.weight)
            nn.init.zeros_(self.latent_decoder.bias)
        # Standardisation of covariates and targets, measured on the training set at the start of fit.
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("covariate_mean", torch.zeros(num_cov))
        self.register_buffer("covariate_std", torch.ones(num_cov))
        self.register_buffer("target_mean", torch.zeros(self.num_regions, 3))  # baseline, follow-up, change
        self.register_buffer("target_std", torch.ones(3))

        self.frozen = [] if policy.trainable else ["abstract_encoder", "processor", "decoder"]
        for name in self.frozen:
            freeze(getattr(self, name))

        self.train_metrics = _stage_metrics("train")
        self.val_metrics = _stage_metrics("val")
        self.test_metrics = _stage_metrics("test")

    def train(self, mode: bool = True) -> FrozenProcessorFinetuning:
        """Lightning calls ``train()`` every epoch; frozen parts stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    # ---- encode / process / decode -------------------------------------------------------------
    def abstract_params(self, covariates: Tensor, context: Tensor | None = None) -> Tensor:
        """Scaled parameters of A per subject (B, P): learned cohort values, the horizon from the covariates,
        and the ``subject_params`` estimated from the subject's mean feature ``context`` (B, C) and the
        standardised covariates."""
        horizon = covariates[:, self.time_covariate_index]
        cohort = self.param_low + (self.param_high - self.param_low) * torch.sigmoid(self.cohort_logits)
        params = cohort.unsqueeze(0).expand(len(horizon), -1).clone()
        params[:, self.time_index] = horizon
        if self.param_head is not None:
            if context is None:
                raise ValueError(f"subject_params {self.subject_params} need the subject's features (context)")
            cov = (covariates - self.covariate_mean) / self.covariate_std
            logits = self.param_head(torch.cat([context, cov], dim=-1))  # (B, S)
            idx = self.subject_param_index
            low, high = self.param_low[idx], self.param_high[idx]
            params[:, idx] = low + (high - low) * torch.sigmoid(self.cohort_logits[idx] + logits)
        return params / self.param_scale

    def check_horizons(self, covariates: Tensor, subject_ids: list[str]) -> None:
        """Refuse, naming the subjects, a time covariate outside ``[0, max_time]``: frozen ``P`` was never
        trained beyond its pretraining horizon, and a negative time has no meaning for ``A``."""
        horizon = covariates[:, self.time_covariate_index]
        high = self.max_time * (1 + 1e-6) if self.max_time else float("inf")
        outside = (horizon < 0) | (horizon > high)  # one device sync per step, as any bounds check needs
        if bool(outside.any()):
            listed = ", ".join(
                f"{s} ({h:.2f})" for s, h, o in zip(subject_ids, horizon.tolist(), outside.tolist()) if o
            )
            raise ValueError(
                f"subject(s) {listed}: the follow-up {self.covariate_names[self.time_covariate_index]!r} lies outside "
                f"[0, {self.max_time}] years, the range the processor was pretrained on; pretrain with a longer time "
                "range, or correct the covariate"
            )

    def encode(self, b: ScanBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """f'(x): returns latents (B*R, H), the estimated abstract state (B, R), scaled covariates (B, C) and
        the voxels of each region the encoder pooled (B, R)."""
        if b.target.shape[1] != self.num_regions:
            raise ValueError(f"batch has {b.target.shape[1]} regions but the connectome has {self.num_regions}")
        self.check_horizons(b.covariates, b.subject_ids)
        pooled, counts = self.encoder(b.image, b.labels, self.num_regions)  # (B, R, C), (B, R)
        present = (counts > 0).float().unsqueeze(-1)  # (B, R, 1)
        context = (pooled * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp_min(1)  # (B, 1, C)
        cov = (b.covariates - self.covariate_mean) / self.covariate_std  # (B, C)
        bsz, regions = counts.shape
        parts = [pooled, context.expand_as(pooled), present, cov.unsqueeze(1).expand(bsz, regions, -1)]
        if self.region_centring is not None:  # deviations from the cohort's mean of each region
            parts.append(self.region_centring(pooled, present))
        head_in = torch.cat(parts, dim=-1)
        # in (0, 1): the range of states P was pretrained on, so frozen P is never asked to extrapolate
        state = torch.sigmoid(self.state_head(head_in).squeeze(-1) + self.state_bias)  # (B, R)
        return self.embed(state, self.abstract_params(b.covariates, context.squeeze(1))), state, cov, counts

    def embed(self, state: Tensor, params: Tensor) -> Tensor:
        """f([x', p]) per region: states (B, R) and scaled parameters of A (B, P) -> latents (B*R, H)."""
        bsz, regions = state.shape
        abstract = torch.cat(
            [state.unsqueeze(-1), params.unsqueeze(1).expand(bsz, regions, -1)], dim=-1
        )  # (B, R, 1 + P)
        return self.abstract_encoder(abstract.reshape(bsz * regions, -1))

    def process(self, z: Tensor, num_subjects: int) -> Tensor:
        """P on the connectome of every subject. (B*R, H) -> (B*R, H)"""
        edges, weights, batch = batch_graph(self.edge_index, self.edge_weight, self.num_regions, num_subjects)
        return self.processor(z, edge_index=edges, edge_weight=weights, batch=batch)

    def forward(self, b: ScanBatch) -> dict[str, Tensor]:
        """Prediction (B, R, 2) of (baseline, follow-up); the estimated state, the readout g(z) and the voxels
        pooled per region, (B, R) each."""
        z, state, cov, counts = self.encode(b)
        z_next = self.process(z, b.batch_size)
        bsz = b.batch_size
        now = self.decoder(z).reshape(bsz, self.num_regions)  # g(f'(x)): the current state (the readout)
        after = self.decoder(z_next).reshape(bsz, self.num_regions)  # g(P(f'(x))): the state at follow-up
        gain = self.log_gain.exp()
        offset = self.covariate_decoder(cov).unsqueeze(1) + self.region_bias  # (B, R, 2), in training spreads
        if self.latent_decoder is not None:  # linear, residual: a map of [z, P(z)] (B*R, 2H) -> (B, R, 2)
            offset = offset + self.latent_decoder(torch.cat([z, z_next], dim=-1)).reshape(bsz, self.num_regions, 2)
        if self.hparams.readout != "linear":  # calibrated: g reads the states, positive gains map them to targets
            baseline = self.target_mean[:, 0] + gain[0] * (now - self.state_init) + self.target_std[0] * offset[..., 0]
            mean_change = self.target_mean[:, 2] if self.hparams.change_from_mean else 0.0
            change = mean_change + gain[1] * (after - now) + self.target_std[2] * offset[..., 1]
        else:
            baseline = self.target_mean[:, 0] + self.target_std[0] * offset[..., 0]
            change = self.target_mean[:, 2] + self.target_std[2] * offset[..., 1]
        prediction = torch.stack([baseline, baseline + change], dim=-1)
        return {"prediction": prediction, "state_estimate": state, "readout": now, "voxels": counts}

    # ---- standardisation -------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Measure covariate and target statistics on the training set once (kept in checkpoints)."""
        datamodule = self.trainer.datamodule
        algorithm = getattr(datamodule, "algorithm", None)  # phantoms know the A that made them
        other_class = bool(self.pretrained_algorithm) and self.pretrained_algorithm != type(algorithm).__name__
        if algorithm is not None and (list(algorithm.param_names) != self.param_names or other_class):
            rank_zero_warn(
                f"the data follow {type(algorithm).__name__} (parameters {list(algorithm.param_names)}) but the processor "
                f"artifact was pretrained on {self.pretrained_algorithm or 'an algorithm'} (parameters {self.param_names}): "
                "P emulates another algorithm than the one in the scans (for Fisher-KPP phantoms stack "
                "configs/natural/fkpp.yaml, which names its artifact)"
            )
        if bool(self.stats_ready):
            return
        if datamodule is None:
            raise RuntimeError("FrozenProcessorFinetuning needs a datamodule (its training targets set the scales)")
        if hasattr(datamodule, "train_table"):
            targets, covariates = datamodule.train_table()
        else:  # any datamodule of ScanBatches: one pass over its training data
            batches = list(datamodule.train_dataloader())
            targets = torch.cat([b.target for b in batches])
            covariates = torch.cat([b.covariates for b in batches])
        targets, covariates = targets.to(self.device).float(), covariates.to(self.device).float()
        mean, std = target_statistics(targets)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)
        self.covariate_mean.copy_(covariates.mean(0))
        self.covariate_std.copy_(
            covariates.std(0).nan_to_num(1.0).clamp_min(1e-6)
            if len(covariates) > 1
            else torch.ones_like(self.covariate_std)
        )
        self.stats_ready.fill_(True)

    # ---- one shared step -------------------------------------------------------------------------
    def model_step(self, b: ScanBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean squared error of baseline, follow-up and change, each in units of its training spread."""
        out = self(b)
        pred, target = out["prediction"], b.target
        terms = [
            (pred[..., 0], target[..., 0], self.target_std[0], 1.0),
            (pred[..., 1], target[..., 1], self.target_std[1], 1.0),
            (
                pred[..., 1] - pred[..., 0],
                target[..., 1] - target[..., 0],
                self.target_std[2],
                self.hparams.change_weight,
            ),
        ]
        loss = pred.new_zeros(())
        for value, truth, scale, weight in terms:
            known = torch.isfinite(truth)
            if known.any():
                loss = loss + weight * nn.functional.mse_loss(value[known] / scale, truth[known] / scale)
        growing = torch.isfinite(target).all(-1) & (target > 0).all(-1)  # (B, R)
        if self.hparams.log_ratio_weight > 0 and growing.any():
            ratio = torch.log(pred[..., 1].clamp_min(1e-6) / pred[..., 0].clamp_min(1e-6))
            truth = torch.log(target[..., 1] / target[..., 0])
            loss = loss + self.hparams.log_ratio_weight * nn.functional.mse_loss(ratio[growing], truth[growing])
        return loss, out

    def _shared(self, stage: str, b: ScanBatch) -> Tensor:
        loss, out = self.model_step(b)
        check_loss(loss, stage, self.global_step, b.subject_ids)
        metrics = getattr(self, f"{stage}_metrics")
        pred, target = out["prediction"].detach(), b.target
        log = {"batch_size": b.batch_size, "on_step": False, "on_epoch": True}
        both = torch.isfinite(target).all(-1)
        if both.any():
            metrics["change"].update((pred[..., 1] - pred[..., 0])[both], (target[..., 1] - target[..., 0])[both])
            self.log_dict(metrics["change"], prog_bar=stage == "val", **log)
        follow = torch.isfinite(target[..., 1])
        if follow.any():
            metrics["mae_followup"].update(pred[..., 1][follow], target[..., 1][follow])
            self.log(f"{stage}/mae_followup", metrics["mae_followup"], **log)
        known = torch.isfinite(b.state)
        if stage != "train" and known.sum() > 1:
            metrics["state_corr"].update(out["readout"][known].detach(), b.state[known])
            self.log(f"{stage}/state_corr", metrics["state_corr"], **log)
        self.log(
            f"{stage}/loss",
            loss,
            batch_size=b.batch_size,
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=stage != "train",
        )
        return loss

    def training_step(self, b: ScanBatch, batch_idx: int) -> Tensor:
        self._batch_subjects = b.subject_ids  # named if a gradient of this batch is not finite
        return self._shared("train", b)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        check_gradients(self.parameters(), self.global_step, getattr(self, "_batch_subjects", None))

    def validation_step(self, b: ScanBatch, batch_idx: int) -> None:
        self._shared("val", b)

    def test_step(self, b: ScanBatch, batch_idx: int) -> None:
        self._shared("test", b)

    def predict_step(self, b: ScanBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Per subject: predicted follow-up and baseline per region, the decoded current state, and the
        covariates (the horizon the follow-up refers to)."""
        out = self(b)
        return {
            "subject_ids": b.subject_ids,
            "covariates": b.covariates.cpu(),
            "followup": out["prediction"][..., 1].cpu(),
            "baseline": out["prediction"][..., 0].cpu(),
            "state": out["readout"].cpu(),
            "voxels": out[
                "voxels"
            ].cpu(),  # 0: the region is not in the label map; its values come from P and the mean alone
        }

    def configure_optimizers(self) -> Any:
        factors = {name: self.hparams.abstract_lr_factor for name in ("abstract_encoder", "processor", "decoder")}
        factors["cohort_logits"] = self.hparams.cohort_lr_factor
        factors["log_gain"] = self.hparams.gain_lr_factor
        return configure_optimizers(self, self.optimizer, self.lr_scheduler, lr_factors=factors)
