"""The natural model of RMR as a plain ``nn.Module``: ``g'(P(f(f'(x))))`` from a baseline scan.

Encode: a 3D CNN pools voxel features into one vector per atlas region; a small head maps each region
(with the covariates) to the abstract state ``x'`` the processor was trained on, and the pretrained
linear ``f`` embeds ``[x', parameters of A]`` into ``P``'s latent space. Mapping into the abstract inputs
first keeps ``f'(x)`` on the manifold of latents ``P`` saw in pretraining (latent alignment; RMR,
Velickovic et al. 2022, Sec. 3). Process: ``P`` on the connectome. Decode: the abstract decoder ``g``
reads the state now, ``g(z)``, and after ``P``, ``g(P(z))``; the calibrated readout maps them to the
targets with positive gains, covariate effects and a per-region offset::

    baseline = mean_0 + a (g(z) - x0) + s_0 offset_0        change = mean_2 + b (g(P(z)) - g(z)) + s_2 offset_2

with ``a, b > 0`` starting at ``state_unit`` and offsets starting at zero, so training starts from the
training mean of every region and the readout ``g(f'(x))`` keeps the meaning of the algorithm's state.

Variants differ only in where ``f``, ``P`` and ``g`` come from and whether they learn:

=========  ======================  =========  ===============================================
variant    f, P, g start from      learn?     what it tests
=========  ======================  =========  ===============================================
rmr        the artifact            no         RMR: the reasoning is already in P
unfrozen   the artifact            yes        does freezing help with few scans?
scratch    random init             yes        the graph prior without the pretraining
random_p   random init             no         a frozen random graph network
baseline   random init, P -> MLP   yes        no processor, same depth and width, no graph
=========  ======================  =========  ===============================================

The module needs no Lightning: build it from a loaded artifact, ``calibrate`` it on training targets,
call it on a ``ScanBatch``. ``rmr_lightning.finetuning.NaturalFinetuning`` trains it.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from processors.base import Processor
from processors.mlp import MLPProcessor
from rmr_lightning.algorithms import AbstractSpec
from rmr_lightning.artifact import ProcessorArtifact
from rmr_lightning.centring import RegionCentring
from rmr_lightning.data.batches import ScanBatch
from rmr_lightning.data.connectome import batch_graph, graph_tensors, load_dk84
from rmr_lightning.encoders import RegionCNN

Variant = Literal["rmr", "baseline", "scratch", "unfrozen", "random_p"]
#: sigmoid(-3) ~ 0.05: the estimated state starts near a typical regional load.
STATE_LOGIT_INIT = -3.0
STATE_INIT = 1.0 / (1.0 + math.exp(-STATE_LOGIT_INIT))
#: The parts that come from the artifact; frozen together where the variant does not train them.
ABSTRACT_PARTS = ("abstract_encoder", "processor", "decoder")
#: P check R^2 at and above which a frozen P is trusted fully, and at and below which not at (docs/design.md).
TRUST_FULL, TRUST_NONE = 0.9, 0.5


def trust_from_r2(r2: float) -> float:
    """Trust in a frozen P from its P check: 0 up to ``TRUST_NONE``, rising linearly to 1 at ``TRUST_FULL``."""
    return min(1.0, max(0.0, (r2 - TRUST_NONE) / (TRUST_FULL - TRUST_NONE)))


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


@dataclass(frozen=True)
class StateHeadConfig:
    """How ``f'`` turns pooled regional features into the abstract state and the parameters of A.

    Args:
        hidden: width of the per-region head.
        region_centring: give the head each region's features also as a deviation from that region's
            training mean (``RegionCentring``).
        state_init: the state every region starts from (0.05 for brain regions, ~0.3 for lesions).
        subject_params: parameters of A estimated per scan (a head on the subject's mean feature, kept
            inside the pretraining range); the others are learned cohort constants or the time covariate.
        region_volume: give the head each region's log voxel count in the label map as one more feature.
            With a label map per scan (FreeSurfer's ``aparc+aseg``) a region's size is its atrophy: a hard
            segmentation drops the voxels where lost grey matter became CSF, and intensity inside what is
            left barely changes. With one atlas for every scan it is a constant and carries nothing.
    """

    hidden: int = 32
    region_centring: bool = True
    state_init: float = STATE_INIT
    subject_params: list[str] | None = None
    region_volume: bool = False


@dataclass(frozen=True)
class ReadoutConfig:
    """``g'``: how the decoded states become targets.

    Args:
        kind: ``calibrated`` (positive gains on ``g``'s states, above), ``linear`` (a free linear map of
            ``[z, P(z)]``, as in the RMR paper) or ``residual`` (calibrated plus a zero-initialised linear map).
        change_from_mean: the change starts from the training mean change plus ``P``'s change (brain: ageing
            is most of it) or from ``P``'s change alone (lesions: growth is all of it).
        state_unit: target units per unit of state, where the gains start (lesions: mL per 20 mm sphere).
        trust: ``checked``: a frozen pretrained ``P`` (``rmr``) gets a trainable fallback
            (``TrustFallback``, the abstract path of ``baseline`` or ``scratch``), and the change of the state reads
            ``t (g(P(z)) - g(z)) + (1 - t) (fallback's change)`` with the trust ``t`` set at the start of
            fit from the P check (``trust_from_r2``); ``full``: ``t = 1`` always, no fallback (also where
            ``subject_params`` are estimated per scan, which the check cannot follow).
        fallback: ``graph`` (``scratch``'s fresh ``P`` on the connectome) or ``mlp`` (``baseline``'s
            node-wise MLP): what an untrusted ``P`` hands the change to. ``graph`` was better at trust 0 on
            both phantom sets (docs/results/imperfect_p.md).
        flag_days: also a logit per region that its volume doubling time ``t ln 2 / ln(V1 / V0)`` is under
            this many days (lesions: 400, suspicious growth), trained as a classification target from the
            region's features, its state and ``P``'s change. A flag read off regressed volumes errs where
            true doubling times lie near the threshold, as a regression shrinks toward the mean.
    """

    kind: Literal["calibrated", "linear", "residual"] = "calibrated"
    change_from_mean: bool = True
    state_unit: float = 1.0
    trust: Literal["checked", "full"] = "checked"
    fallback: Literal["mlp", "graph"] = "graph"
    flag_days: float | None = None


@dataclass(frozen=True)
class GraphConfig:
    """The graph ``P`` runs on: ``dk84`` (the shipped connectome; label r is node r-1) or ``isolated``
    (``region_names`` nodes without edges, e.g. one lesion per scan)."""

    connectome: Literal["dk84", "isolated"] = "dk84"
    region_names: list[str] | None = None


def freeze(module: nn.Module) -> nn.Module:
    """The one place parameters are frozen: no gradients, eval mode (kept by ``NaturalModel.train``)."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


def reinitialise(module: nn.Module) -> nn.Module:
    """A trainable copy of ``module`` with fresh random weights (every submodule's ``reset_parameters``),
    even where ``module`` is frozen (the fallback copies the frozen artifact's ``f``, ``P`` and ``g``)."""
    fresh = copy.deepcopy(module)
    for sub in fresh.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    return fresh.requires_grad_(True).train()


def aligned_random_pair(encoder: nn.Linear, decoder: nn.Linear) -> tuple[nn.Linear, nn.Linear]:
    """Fresh random ``f`` and a ``g`` with ``g(f([x, p])) = x`` exactly: the state read-out anchoring the
    pretrained pair has, given to the variants without pretraining so that only the learned dynamics
    differ. ``g``'s weight is ``f``'s state column made orthogonal to its parameter columns and bias."""
    f, g = reinitialise(encoder), reinitialise(decoder)
    with torch.no_grad():
        state_col = f.weight[:, 0]  # (H,)
        others = torch.cat([f.weight[:, 1:], f.bias.unsqueeze(1)], dim=1)  # (H, P + 1)
        basis, _ = torch.linalg.qr(others)
        u = state_col - basis @ (basis.T @ state_col)
        g.weight.copy_((u / (u @ state_col)).unsqueeze(0))
        g.bias.zero_()
    return f, g


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


def graph_of(graph: GraphConfig) -> tuple[Tensor, list[str]]:
    """The adjacency (R, R) and region names of the graph ``P`` runs on."""
    if graph.connectome == "dk84":
        return load_dk84()
    if graph.connectome == "isolated":
        names = list(graph.region_names or ["lesion"])
        return torch.zeros(len(names), len(names), dtype=torch.float64), names
    raise ValueError(f"connectome must be 'dk84' or 'isolated', got {graph.connectome!r}")


def _default_flag_threshold(state_dict: dict, prefix: str, *args) -> None:
    """A checkpoint written before the flag's operating point was kept: 0.5, said once on load."""
    key = prefix + "flag_threshold"
    if key not in state_dict and any(k.startswith(prefix + "flag_head.") for k in state_dict):
        warnings.warn(
            "the checkpoint has a suspicious-growth flag but no operating point chosen on validation "
            "(written before it was kept); flagging at probability 0.5",
            stacklevel=2,
        )
        state_dict[key] = torch.full((), 0.5)


def _apply_loaded_trust(module: nn.Module, incompatible_keys: object) -> None:
    """After a checkpoint is loaded: the fallback runs and learns as its stored trust says."""
    module.set_trust(float(module.trust))


class TrustFallback(nn.Module):
    """What a frozen ``P`` falls back to as far as it is not trusted: the abstract path of a variant without
    pretraining, with its own fresh ``f`` and ``g`` (aligned, as those variants get), all trainable. ``mlp``:
    ``baseline``'s node-wise MLP of ``P``'s depth and width; ``graph``: ``scratch``'s fresh copy of ``P``'s
    architecture on the connectome. ``change(abstract inputs (B*R, 1+P), graph) -> (B*R, 1)``:
    ``g(F(f(x))) - g(f(x))``."""

    def __init__(self, encoder: nn.Linear, decoder: nn.Linear, processor: Processor, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in ("mlp", "graph"):
            raise ValueError(f"readout.fallback must be 'mlp' or 'graph', got {kind!r}")
        self.encoder, self.decoder = aligned_random_pair(encoder, decoder)
        self.processor: Processor = (
            reinitialise(processor)
            if kind == "graph"
            else MLPProcessor(processor.hidden_dim, num_layers=processor.num_layers)
        )

    def change(self, abstract: Tensor, **graph: Tensor) -> Tensor:
        z = self.encoder(abstract)
        return self.decoder(self.processor(z, **graph)) - self.decoder(z)


class NaturalModel(nn.Module):
    """``f'`` (scan -> abstract state) -> ``f`` -> ``P`` on the graph -> ``g'`` (readout); see the module doc.

    Args:
        artifact: the loaded processor artifact (``f``, ``P``, ``g`` and the abstract spec).
        variant: where ``f``, ``P``, ``g`` come from and whether they learn (``POLICIES``).
        encoder: region encoder ``(image, labels, R) -> (features (B, R, C), voxel counts (B, R))`` with an
            ``out_channels`` attribute (default ``RegionCNN()``).
        covariate_names: the batch's covariate columns; ``time_covariate`` is A's time (years to follow-up).
        head, readout, graph: the typed settings above.
    """

    def __init__(
        self,
        artifact: ProcessorArtifact,
        variant: Variant = "rmr",
        encoder: nn.Module | None = None,
        covariate_names: list[str] | None = None,
        time_covariate: str = "horizon",
        head: StateHeadConfig | None = None,
        readout: ReadoutConfig | None = None,
        graph: GraphConfig | None = None,
    ) -> None:
        super().__init__()
        if variant not in POLICIES:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(POLICIES)}")
        head, readout, graph = head or StateHeadConfig(), readout or ReadoutConfig(), graph or GraphConfig()
        if readout.kind not in ("calibrated", "linear", "residual"):
            raise ValueError(f"readout must be 'calibrated', 'linear' or 'residual', got {readout.kind!r}")
        if not 0.0 < head.state_init < 1.0:
            raise ValueError(f"state_init must lie in (0, 1), got {head.state_init}")
        if readout.state_unit <= 0:
            raise ValueError(f"state_unit must be positive, got {readout.state_unit}")
        self.covariate_names = list(covariate_names or ["age", "horizon"])
        if time_covariate not in self.covariate_names:
            raise ValueError(f"time_covariate {time_covariate!r} is not among the covariates {self.covariate_names}")
        self.variant, self.policy, self.readout_config = variant, POLICIES[variant], readout
        self.time_covariate_index = self.covariate_names.index(time_covariate)
        self._read_spec(artifact.abstract_spec, head)
        self._build_graph(graph)
        self._build_state_head(encoder, head)
        decoder = self._build_abstract(artifact)
        self._build_readout(decoder, artifact.processor.hidden_dim, readout)
        self.frozen = [] if self.policy.trainable else list(ABSTRACT_PARTS)
        for name in self.frozen:
            freeze(getattr(self, name))
        self._build_fallback(artifact.processor, readout)
        self._build_flag_head(readout)

    def _build_fallback(self, processor: Processor, readout: ReadoutConfig) -> None:
        """The fallback of a frozen pretrained P and the trust in P (1 until the P check sets it). Drawn on a
        forked random state, so every other draw of the run is what it was without it. At trust 1 it is
        frozen and skipped (``set_trust``): no compute, and no parameters DDP would wait on in vain."""
        self.register_buffer("trust", torch.ones(()))
        self.fallback_active = False  # a Python flag, so the forward needs no device sync to skip it
        self.fallback: TrustFallback | None = None
        if readout.trust not in ("checked", "full"):
            raise ValueError(f"readout.trust must be 'checked' or 'full', got {readout.trust!r}")
        # per-scan parameters of A (subject_params) are beyond the P check's one cohort value: no trust from it
        if (
            readout.trust == "checked"
            and self.policy.pretrained
            and not self.policy.trainable
            and not self.subject_params
        ):
            with torch.random.fork_rng(devices=[]):
                self.fallback = TrustFallback(self.abstract_encoder, self.decoder, processor, readout.fallback)
            self.fallback.requires_grad_(False)
            self.register_load_state_dict_post_hook(_apply_loaded_trust)

    def set_trust(self, trust: float) -> None:
        """The trust in frozen P (``trust_from_r2``): below 1 the fallback learns and takes ``1 - trust`` of the
        change; at 1 it is frozen and not run. Set before the optimiser and DDP see the parameters."""
        self.trust.fill_(trust)
        if self.fallback is not None:
            self.fallback_active = trust < 1.0
            self.fallback.requires_grad_(self.fallback_active)

    def _build_flag_head(self, readout: ReadoutConfig) -> None:
        """The suspicious-growth logit (``readout.flag_days``), on a forked random state as the fallback."""
        self.flag_head: nn.Module | None = None
        if readout.flag_days is not None:
            if readout.flag_days <= 0:
                raise ValueError(f"readout.flag_days must be positive, got {readout.flag_days}")
            # the operating point: the probability at which validation reaches 90 % specificity, set at each
            # validation, so the checkpoint chosen on validation carries the threshold of that validation
            self.register_buffer("flag_threshold", torch.full((), 0.5))
            self._register_load_state_dict_pre_hook(_default_flag_threshold)
            first = self.state_head[0]  # the flag head is the state head's size, with two more inputs
            with torch.random.fork_rng(devices=[]):  # features, state now and P's change -> logit
                self.flag_head = nn.Sequential(
                    nn.Linear(first.in_features + 2, first.out_features), nn.ReLU(), nn.Linear(first.out_features, 1)
                )

    # ---- construction (in this order: the random draws of every variant depend on it) -------------
    def _read_spec(self, spec: AbstractSpec, head: StateHeadConfig) -> None:
        """What ``P`` was pretrained on: A's parameters, their scales and ranges, the time bound."""
        if spec.time_param is None:
            raise ValueError(f"P was pretrained on {spec.algorithm or 'an algorithm'} without a time parameter")
        self.param_names: list[str] = list(spec.param_names)
        self.max_time: float | None = spec.max_time
        self.pretrained_algorithm = spec.algorithm_name  # class name of the A P emulates
        self.time_index = self.param_names.index(spec.time_param)
        self.subject_params = list(head.subject_params or [])
        unknown = [p for p in self.subject_params if p not in self.param_names or p == spec.time_param]
        if unknown:
            raise ValueError(f"subject_params {unknown} are not parameters of A other than time: {self.param_names}")
        self.subject_param_index = [self.param_names.index(p) for p in self.subject_params]
        self.register_buffer("param_scale", torch.tensor(spec.param_scale, dtype=torch.float32), persistent=False)
        self._ranges = spec.ranges

    def _build_graph(self, graph: GraphConfig) -> None:
        conn, self.region_names = graph_of(graph)
        edge_index, edge_weight = graph_tensors(conn)
        self.register_buffer("edge_index", edge_index, persistent=False)
        self.register_buffer("edge_weight", edge_weight, persistent=False)
        self.num_regions = conn.shape[0]

    def _build_state_head(self, encoder: nn.Module | None, head: StateHeadConfig) -> None:
        """``f'``: the CNN, the per-region state head, the per-subject parameter head, A's cohort values."""
        self.encoder = encoder if encoder is not None else RegionCNN()
        self.region_volume = head.region_volume
        channels, num_cov = int(self.encoder.out_channels) + int(head.region_volume), len(self.covariate_names)
        self.region_centring = RegionCentring(self.num_regions, channels) if head.region_centring else None
        # head input per region: its features, the subject's mean feature (contrast, scanner), presence, covariates
        head_in = (3 if head.region_centring else 2) * channels + 1 + num_cov
        self.state_head = nn.Sequential(nn.Linear(head_in, head.hidden), nn.ReLU(), nn.Linear(head.hidden, 1))
        self.state_init = float(head.state_init)
        # regions differ in partial volume; the offset starts the estimate near state_init (most regions are healthy)
        self.state_bias = nn.Parameter(
            torch.full((self.num_regions,), math.log(self.state_init / (1.0 - self.state_init)))
        )
        self.param_head = None  # per-subject parameters of A, starting mid-range
        if self.subject_params:
            self.param_head = nn.Sequential(
                nn.Linear(channels + num_cov, head.hidden), nn.ReLU(), nn.Linear(head.hidden, len(self.subject_params))
            )
            nn.init.zeros_(self.param_head[-1].weight)
            nn.init.zeros_(self.param_head[-1].bias)
        # Cohort-level parameters of A other than time (e.g. gamma): learned, but kept inside the range P
        # was pretrained on (low + (high - low) * sigmoid), starting mid-range.
        self.cohort_logits = nn.Parameter(torch.zeros(len(self.param_names)))
        self.register_buffer(
            "param_low", torch.tensor([r[0] for r in self._ranges], dtype=torch.float32), persistent=False
        )
        self.register_buffer(
            "param_high", torch.tensor([r[1] for r in self._ranges], dtype=torch.float32), persistent=False
        )

    def _build_abstract(self, artifact: ProcessorArtifact) -> nn.Linear:
        """``f``, ``P`` and (returned, registered by the readout) ``g``: the artifact's, fresh aligned random
        ones, or (baseline) an MLP for ``P``."""
        if self.policy.pretrained:
            self.abstract_encoder, decoder = artifact.encoder, artifact.decoder
        else:
            self.abstract_encoder, decoder = aligned_random_pair(artifact.encoder, artifact.decoder)
        if self.policy.graph_free:
            self.processor: Processor = MLPProcessor(
                artifact.processor.hidden_dim, num_layers=artifact.processor.num_layers
            )
        else:
            self.processor = artifact.processor if self.policy.pretrained else reinitialise(artifact.processor)
        return decoder

    def _build_readout(self, decoder: nn.Linear, hidden: int, readout: ReadoutConfig) -> None:
        """``g'``: ``g`` reads the state now and after ``P``; positive gains, covariate effects and a
        per-region offset map them to (baseline, change) in units standardised on the training set."""
        self.decoder = decoder
        self.log_gain = nn.Parameter(
            torch.full((2,), math.log(readout.state_unit))
        )  # gains > 0 anchor the state's sign
        num_cov = len(self.covariate_names)
        self.covariate_decoder = nn.Linear(num_cov, 2)
        nn.init.zeros_(self.covariate_decoder.weight)  # start from the training mean of every region
        nn.init.zeros_(self.covariate_decoder.bias)
        self.region_bias = nn.Parameter(torch.zeros(self.num_regions, 2))
        # linear: a free map of [z, P(z)] instead of the calibrated g; residual: calibrated plus such a map from zero
        self.latent_decoder = nn.Linear(2 * hidden, 2) if readout.kind != "calibrated" else None
        if readout.kind == "residual":
            nn.init.zeros_(self.latent_decoder.weight)
            nn.init.zeros_(self.latent_decoder.bias)
        # standardisation of covariates and targets, measured on the training set by ``calibrate``
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("covariate_mean", torch.zeros(num_cov))
        self.register_buffer("covariate_std", torch.ones(num_cov))
        self.register_buffer("target_mean", torch.zeros(self.num_regions, 3))  # baseline, follow-up, change
        self.register_buffer("target_std", torch.ones(3))

    def train(self, mode: bool = True) -> NaturalModel:
        """Lightning calls ``train()`` every epoch; frozen parts stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    def calibrate(self, targets: Tensor, covariates: Tensor) -> None:
        """Covariate and target statistics of the training set, targets (n, R, 2), covariates (n, C);
        once per model (kept in its state dict), so predictions start from the training means."""
        targets, covariates = (
            targets.to(self.target_mean.device).float(),
            covariates.to(self.target_mean.device).float(),
        )
        mean, std = target_statistics(targets)
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)
        self.covariate_mean.copy_(covariates.mean(0))
        spread = (
            covariates.std(0).nan_to_num(1.0).clamp_min(1e-6)
            if len(covariates) > 1
            else torch.ones_like(self.covariate_std)
        )
        self.covariate_std.copy_(spread)
        self.stats_ready.fill_(True)

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
                f"{s} ({h:.2f})" for s, h, o in zip(subject_ids, horizon.tolist(), outside.tolist(), strict=True) if o
            )
            raise ValueError(
                f"subject(s) {listed}: the follow-up {self.covariate_names[self.time_covariate_index]!r} lies "
                f"outside [0, {self.max_time}] years, the range the processor was pretrained on; pretrain with a "
                "longer time range, or correct the covariate"
            )

    def encode(self, b: ScanBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """f'(x): returns the abstract inputs ``[x', p]`` (B*R, 1+P), the estimated state (B, R), scaled
        covariates (B, C), the voxels of each region the encoder pooled (B, R) and the head's input (B, R, F)."""
        if b.target.shape[1] != self.num_regions:
            raise ValueError(f"batch has {b.target.shape[1]} regions but the connectome has {self.num_regions}")
        self.check_horizons(b.covariates, b.subject_ids)
        pooled, counts = self.encoder(b.image, b.labels, self.num_regions)  # (B, R, C), (B, R)
        if self.region_volume:  # (B, R, C + 1): the region's size in the label map
            pooled = torch.cat([pooled, torch.log1p(counts).unsqueeze(-1)], dim=-1)
        present = (counts > 0).float().unsqueeze(-1)  # (B, R, 1)
        context = (pooled * present).sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp_min(1)  # (B, 1, C)
        cov = (b.covariates - self.covariate_mean) / self.covariate_std  # (B, C)
        bsz, regions = counts.shape
        parts = [pooled, context.expand_as(pooled), present, cov.unsqueeze(1).expand(bsz, regions, -1)]
        if self.region_centring is not None:  # deviations from the cohort's mean of each region
            parts.append(self.region_centring(pooled, present))
        # in (0, 1): the range of states P was pretrained on, so frozen P is never asked to extrapolate
        features = torch.cat(parts, dim=-1)  # (B, R, F)
        state = torch.sigmoid(self.state_head(features).squeeze(-1) + self.state_bias)  # (B, R)
        abstract = self.abstract_inputs(state, self.abstract_params(b.covariates, context.squeeze(1)))
        return abstract, state, cov, counts, features

    @staticmethod
    def abstract_inputs(state: Tensor, params: Tensor) -> Tensor:
        """``[x', p]`` per region: states (B, R) and scaled parameters of A (B, P) -> (B*R, 1+P)."""
        bsz, regions = state.shape
        abstract = torch.cat([state.unsqueeze(-1), params.unsqueeze(1).expand(bsz, regions, -1)], dim=-1)  # (B, R, 1+P)
        return abstract.reshape(bsz * regions, -1)

    def embed(self, state: Tensor, params: Tensor) -> Tensor:
        """f([x', p]) per region: states (B, R) and scaled parameters of A (B, P) -> latents (B*R, H)."""
        return self.abstract_encoder(self.abstract_inputs(state, params))

    def batched_graph(self, num_subjects: int) -> dict[str, Tensor]:
        """The connectome once per subject, as ``P``'s keyword arguments ``edge_index``, ``edge_weight``, ``batch``."""
        edges, weights, batch = batch_graph(self.edge_index, self.edge_weight, self.num_regions, num_subjects)
        return {"edge_index": edges, "edge_weight": weights, "batch": batch}

    def process(self, z: Tensor, num_subjects: int) -> Tensor:
        """P on the connectome of every subject. (B*R, H) -> (B*R, H)"""
        return self.processor(z, **self.batched_graph(num_subjects))

    def forward(self, b: ScanBatch) -> dict[str, Tensor]:
        """Prediction (B, R, 2) of (baseline, follow-up); the estimated state, the readout g(z) and the voxels
        pooled per region, (B, R) each."""
        abstract, state, cov, counts, features = self.encode(b)
        z = self.abstract_encoder(abstract)  # f: (B*R, H)
        z_next = self.process(z, b.batch_size)
        bsz = b.batch_size
        now = self.decoder(z).reshape(bsz, self.num_regions)  # g(f'(x)): the current state (the readout)
        after = self.decoder(z_next).reshape(bsz, self.num_regions)  # g(P(f'(x))): the state at follow-up
        delta = after - now  # P's change of the state, (B, R)
        if self.fallback_active:  # as far as P is not trusted, the fallback's change (set_trust: only with one)
            moved = self.fallback.change(abstract, **self.batched_graph(bsz)).reshape(bsz, self.num_regions)
            delta = self.trust * delta + (1 - self.trust) * moved
        gain = self.log_gain.exp()
        offset = self.covariate_decoder(cov).unsqueeze(1) + self.region_bias  # (B, R, 2), in training spreads
        if self.latent_decoder is not None:  # linear, residual: a map of [z, P(z)] (B*R, 2H) -> (B, R, 2)
            offset = offset + self.latent_decoder(torch.cat([z, z_next], dim=-1)).reshape(bsz, self.num_regions, 2)
        mean, std = self.target_mean, self.target_std
        if self.readout_config.kind != "linear":  # calibrated: positive gains map g's states to targets
            baseline = mean[:, 0] + gain[0] * (now - self.state_init) + std[0] * offset[..., 0]
            mean_change = mean[:, 2] if self.readout_config.change_from_mean else 0.0
            change = mean_change + gain[1] * delta + std[2] * offset[..., 1]
        else:
            baseline = mean[:, 0] + std[0] * offset[..., 0]
            change = mean[:, 2] + std[2] * offset[..., 1]
        prediction = torch.stack([baseline, baseline + change], dim=-1)
        out = {"prediction": prediction, "state_estimate": state, "readout": now, "voxels": counts}
        if self.flag_head is not None:  # (B, R) logit of a doubling time under flag_days
            flag_in = torch.cat([features, now.unsqueeze(-1), delta.unsqueeze(-1)], dim=-1)
            out["flag_logit"] = self.flag_head(flag_in).squeeze(-1)
        return out
