"""Stage 2 of RMR: train the natural model (``rmr_lightning.natural``) on labelled scans.

``NaturalFinetuning`` holds what training needs and the model does not: the loss on baseline, follow-up
and change (each in units of its training spread), the metrics per stage, the measurement of the
training set's target statistics at the start of fit (stored in the model, which predicts with them),
and the optimiser groups with their learning-rate factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MetricCollection, PearsonCorrCoef, R2Score
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryRecall,
    BinarySensitivityAtSpecificity,
    BinarySpecificity,
)

from rmr_lightning.algorithms import GraphAlgorithm, suspicious_growth
from rmr_lightning.artifact import load_processor_artifact
from rmr_lightning.data.batches import ScanBatch
from rmr_lightning.guards import check_gradients, check_loss
from rmr_lightning.natural import (
    ABSTRACT_PARTS,
    POLICIES,
    GraphConfig,
    NaturalModel,
    ReadoutConfig,
    StateHeadConfig,
    Variant,
    trust_from_r2,
)
from rmr_lightning.optim import configure_optimizers
from rmr_lightning.processor_check import ProcessorCheck, check_processor
from rmr_lightning.protocols import HasAlgorithm, HasTrainTable
from rmr_lightning.typed_config import as_config, plain

#: Pretraining validation R^2 of the change below which a frozen P is warned about (docs/results/imperfect_p.md).
MIN_FROZEN_R2 = 0.95
#: Specificity at which the suspicious-growth flag's sensitivity is reported.
FLAG_SPECIFICITY = 0.9


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss terms beside baseline and follow-up (each weight 1).

    Args:
        change_weight: of the change (follow-up minus baseline), the headline.
        log_ratio_weight: of ``log(follow-up / baseline)`` where both are positive (0: off). For growth the
            log ratio sets the doubling time, ``t ln 2 / ln(V1 / V0)``; the squared errors weigh it by size.
        flag_weight: of the binary cross-entropy of the suspicious-growth logit, where the readout has one
            (``readout.flag_days``); the label is the true doubling time under ``flag_days``.
    """

    change_weight: float = 1.0
    log_ratio_weight: float = 0.0
    flag_weight: float = 1.0


@dataclass(frozen=True)
class LRFactors:
    """Learning-rate factors of parameter groups, relative to the optimiser's rate.

    Args:
        abstract: ``f``, ``P`` and ``g`` where they learn. Adam moves every weight by about the rate, so at
            the encoder's rate a 128-wide linear ``g`` would lose the state's alignment within a few steps.
        cohort: A's cohort parameters (e.g. gamma), which start mid-range.
        gain: the readout's two log-gains; under cosine decay a log-gain travels at most ~``lr * steps / 2``,
            too little at factor 1 to turn down a P whose change is noise (docs/results/demo_mri.md).
    """

    abstract: float = 0.1
    cohort: float = 1.0
    gain: float = 10.0


def _stage_metrics(stage: str) -> nn.ModuleDict:
    """Metric objects of one stage: of the change (the headline), of the follow-up, of the readout."""
    return nn.ModuleDict(
        {
            "change": MetricCollection({"mae": MeanAbsoluteError(), "r2": R2Score()}, prefix=f"{stage}/"),
            "mae_followup": MeanAbsoluteError(),
            "state_corr": PearsonCorrCoef(),
            # suspicious growth, where the readout has a flag: ranking, and sensitivity at 90 % specificity
            "flag_auroc": BinaryAUROC(),
            "flag_sensitivity": BinarySensitivityAtSpecificity(min_specificity=FLAG_SPECIFICITY),
            # at the operating point chosen on validation (``flag_threshold``): what a reader would get
            "flag_sensitivity_at_threshold": BinaryRecall(),
            "flag_specificity_at_threshold": BinarySpecificity(),
        }
    )


class NaturalFinetuning(L.LightningModule):
    """Train ``NaturalModel`` (``g'(P(f(f'(x))))``) for regional baseline and follow-up values from a scan.

    Args:
        processor_artifact: ``processor.pt`` written by pretraining (``make pretrain``).
        variant: ``rmr``, ``baseline``, ``scratch``, ``unfrozen`` or ``random_p`` (``rmr_lightning.natural``).
        encoder: region encoder ``f'`` (default ``RegionCNN()``).
        covariate_names: the batch's covariate columns (linked from the datamodule).
        time_covariate: the covariate that is A's time parameter (years to follow-up).
        head, readout, graph: ``StateHeadConfig``, ``ReadoutConfig``, ``GraphConfig`` of the model.
        loss, lr_factors: ``LossConfig``, ``LRFactors`` of the training.
        optimizer, lr_scheduler: injected callables.
    """

    def __init__(
        self,
        processor_artifact: str = "results/pretrain/processor.pt",
        variant: Variant = "rmr",
        encoder: nn.Module | None = None,
        covariate_names: list[str] | None = None,
        time_covariate: str = "horizon",
        head: StateHeadConfig | None = None,
        readout: ReadoutConfig | None = None,
        graph: GraphConfig | None = None,
        loss: LossConfig | None = None,
        lr_factors: LRFactors | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if variant not in POLICIES:
            raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(POLICIES)}")
        configs = {
            "head": as_config(StateHeadConfig, head),
            "readout": as_config(ReadoutConfig, readout),
            "graph": as_config(GraphConfig, graph),
        }
        self.loss_config, self.lr_factors = as_config(LossConfig, loss), as_config(LRFactors, lr_factors)
        # Under LightningCLI the encoder is saved as its class_path/init_args, so load_from_checkpoint rebuilds
        # a non-default f'; a module passed from Python has no such config and is left out. Typed configs are
        # kept as plain dicts, which a checkpoint read with weights_only=True can hold.
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        if isinstance(self.hparams.get("encoder"), nn.Module):
            self.hparams.pop("encoder")
        for key in ("head", "readout", "graph", "loss", "lr_factors"):
            self.hparams[key] = plain(self.hparams.get(key))
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        artifact = load_processor_artifact(processor_artifact)
        self.artifact_sha256 = artifact.sha256
        self._warn_weak_processor(artifact.metrics.get("val_r2_delta"), variant, processor_artifact)
        self.model = NaturalModel(artifact, variant, encoder, covariate_names, time_covariate, **configs)
        self.processor_check: ProcessorCheck | None = None  # set at the start of fit (variants with the artifact's P)
        self.train_metrics = _stage_metrics("train")
        self.val_metrics = _stage_metrics("val")
        self.test_metrics = _stage_metrics("test")

    @staticmethod
    def _warn_weak_processor(r2: float | None, variant: str, path: str) -> None:
        policy = POLICIES[variant]
        if policy.pretrained and not policy.trainable and r2 is not None and r2 < MIN_FROZEN_R2:
            rank_zero_warn(
                f"{path}: P reached a validation R^2 of the change of only {r2:.3f} in pretraining. "
                f"Frozen Ps below ~{MIN_FROZEN_R2} made rmr worse than baseline with full trust "
                "(docs/results/imperfect_p.md); the P check at the start of fit sets how far it is trusted "
                "(readout.trust: checked), and pretraining longer or variant=unfrozen may do better"
            )

    # what the prediction writer and studies read
    @property
    def region_names(self) -> list[str]:
        return self.model.region_names

    @property
    def covariate_names(self) -> list[str]:
        return self.model.covariate_names

    @property
    def time_covariate_index(self) -> int:
        return self.model.time_covariate_index

    def forward(self, b: ScanBatch) -> dict[str, Tensor]:
        return self.model(b)

    # ---- standardisation -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before fitting: covariate and target statistics of the training set, measured once (kept in
        checkpoints), and the P check. Here, before Lightning builds the optimiser and wraps the model for
        DDP, because the check decides which parameters learn (``NaturalModel.set_trust``)."""
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        algorithm = datamodule.algorithm if isinstance(datamodule, HasAlgorithm) else None  # phantoms know their A
        self._warn_other_algorithm(algorithm)
        if bool(self.model.stats_ready):
            return
        if datamodule is None:
            raise RuntimeError("NaturalFinetuning needs a datamodule (its training targets set the scales)")
        if isinstance(datamodule, HasTrainTable):
            targets, covariates = datamodule.train_table()
        else:  # any datamodule of ScanBatches: one pass over its training data
            batches = list(datamodule.train_dataloader())
            targets = torch.cat([b.target for b in batches])
            covariates = torch.cat([b.covariates for b in batches])
        self.model.calibrate(targets, covariates)
        self._check_processor(targets, covariates)

    def _check_processor(self, targets: Tensor, covariates: Tensor) -> None:
        """How well the artifact's P explains the training set's changes (``processor_check``), and with it
        the trust in a frozen P (``trust_from_r2``): on the console and in every logger, before the first
        step. Variants whose P is not the artifact's are not checked."""
        if not self.model.policy.pretrained:
            return
        self.processor_check = check_processor(self.model, targets, covariates)
        if self.processor_check is None:
            rank_zero_info(
                "P check skipped: fewer than three training subjects have baseline and follow-up values; "
                "a frozen P is trusted fully"
            )
            return
        metrics = self.processor_check.as_metrics()
        text = f"P check: {self.processor_check.summary()}"
        if self.model.subject_params and not self.model.policy.trainable:
            text += (
                f"; not used for trust: parameters {self.model.subject_params} are estimated per scan, "
                "which the check's one cohort value cannot follow, so a frozen P stays fully trusted"
            )
        elif self.model.fallback is not None:
            trust = trust_from_r2(self.processor_check.r2)
            self.model.set_trust(trust)
            metrics["p_check/trust"] = trust
            kind = "graph" if self.model.readout_config.fallback == "graph" else "graph-free"
            text += f"; trust in frozen P {trust:.2f}, the rest from a {kind} fallback"
        rank_zero_info(text)
        if self.trainer.is_global_zero:
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=0)

    def _warn_other_algorithm(self, algorithm: GraphAlgorithm | None) -> None:
        pretrained = self.model.pretrained_algorithm
        if algorithm is None:
            return
        other_class = bool(pretrained) and pretrained != type(algorithm).__name__
        if list(algorithm.param_names) != self.model.param_names or other_class:
            rank_zero_warn(
                f"the data follow {type(algorithm).__name__} (parameters {list(algorithm.param_names)}) but the "
                f"processor artifact was pretrained on {pretrained or 'an algorithm'} (parameters "
                f"{self.model.param_names}): P emulates another algorithm than the one in the scans (for Fisher-KPP "
                "phantoms stack configs/natural/fkpp.yaml, which names its artifact)"
            )

    # ---- one shared step -------------------------------------------------------------------------
    def model_step(self, b: ScanBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean squared error of baseline, follow-up and change, each in units of its training spread."""
        out = self(b)
        pred, target = out["prediction"], b.target
        terms = [
            (pred[..., 0], target[..., 0], self.model.target_std[0], 1.0),
            (pred[..., 1], target[..., 1], self.model.target_std[1], 1.0),
            (
                pred[..., 1] - pred[..., 0],
                target[..., 1] - target[..., 0],
                self.model.target_std[2],
                self.loss_config.change_weight,
            ),
        ]
        loss = pred.new_zeros(())
        for value, truth, scale, weight in terms:
            known = torch.isfinite(truth)
            if known.any():
                loss = loss + weight * nn.functional.mse_loss(value[known] / scale, truth[known] / scale)
        growing = torch.isfinite(target).all(-1) & (target > 0).all(-1)  # (B, R)
        if self.loss_config.log_ratio_weight > 0 and growing.any():
            ratio = torch.log(pred[..., 1].clamp_min(1e-6) / pred[..., 0].clamp_min(1e-6))
            truth = torch.log(target[..., 1] / target[..., 0])
            loss = loss + self.loss_config.log_ratio_weight * nn.functional.mse_loss(ratio[growing], truth[growing])
        if "flag_logit" in out and growing.any():
            labels = self.flag_labels(b)
            out["flag_label"], out["flag_known"] = labels, growing  # (B, R) each, for the metrics
            bce = nn.functional.binary_cross_entropy_with_logits(out["flag_logit"][growing], labels[growing])
            loss = loss + self.loss_config.flag_weight * bce
        return loss, out

    def flag_labels(self, b: ScanBatch) -> Tensor:
        """(B, R) 1.0 where the true doubling time is under ``readout.flag_days`` (Schwartz 1961)."""
        horizon = b.covariates[:, self.time_covariate_index].unsqueeze(1)  # (B, 1) years
        days = self.model.readout_config.flag_days
        return suspicious_growth(b.target[..., 0], b.target[..., 1], horizon, days).float()

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
        if "flag_label" in out:
            growing = out["flag_known"]  # nodules with both volumes positive, as the loss used
            probability, label = torch.sigmoid(out["flag_logit"].detach()[growing]), out["flag_label"][growing].long()
            for name in ("flag_auroc", "flag_sensitivity"):
                metrics[name].update(probability, label)
            self.log(f"{stage}/flag_auroc", metrics["flag_auroc"], **log)
            if stage == "test":
                flagged = (probability >= self.model.flag_threshold).float()
                for name in ("flag_sensitivity_at_threshold", "flag_specificity_at_threshold"):
                    metrics[name].update(flagged, label)
                    self.log(f"{stage}/{name}", metrics[name], **log)
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

    def _log_flag_sensitivity(self, stage: str) -> None:
        """Sensitivity at ``FLAG_SPECIFICITY`` over the epoch (a tuple metric, so computed here)."""
        metric = getattr(self, f"{stage}_metrics")["flag_sensitivity"]
        if metric.update_called:
            sensitivity, threshold = metric.compute()
            self.log(f"{stage}/flag_sensitivity_at_90_specificity", sensitivity)
            if stage == "val" and not self.trainer.sanity_checking:
                self.model.flag_threshold.fill_(float(threshold))
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_flag_sensitivity("train")

    def on_validation_epoch_end(self) -> None:
        self._log_flag_sensitivity("val")

    def on_test_epoch_end(self) -> None:
        self._log_flag_sensitivity("test")

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
            "voxels": out["voxels"].cpu(),  # 0: the region is not in the label map; from P and the mean alone
            # the suspicious-growth flag's probability, and the operating point chosen on validation
            **(
                {
                    "flag_probability": torch.sigmoid(out["flag_logit"]).cpu(),
                    "flag_threshold": self.model.flag_threshold,
                }
                if "flag_logit" in out
                else {}
            ),
        }

    def configure_optimizers(self) -> Any:
        factors = {f"model.{name}": self.lr_factors.abstract for name in ABSTRACT_PARTS}
        factors["model.cohort_logits"] = self.lr_factors.cohort
        factors["model.log_gain"] = self.lr_factors.gain
        if self.model.fallback is not None:
            factors["model.fallback"] = self.lr_factors.abstract  # as baseline's (scratch's) f, P and g
        return configure_optimizers(self, self.optimizer, self.lr_scheduler, lr_factors=factors)
