"""``rmr``: the LightningCLI of rmr_lightning (fit / validate / test / predict).

Models and data are chosen by ``class_path`` in YAML (jsonargparse imports what a config names), so
this file imports neither stage modules nor datamodules. Processors registered in the entry-point
group ``rmr_lightning.processors`` are imported first, so their class names resolve too.
"""

from __future__ import annotations

import netrc
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from processors.registry import available_processors
from rmr_lightning import checkpoints
from rmr_lightning.callbacks import RunIdentity, SaveAndLogConfig
from rmr_lightning.callbacks.run_identity import WANDB_ID_KEY
from rmr_lightning.protocols import HasAbstractSpec, HasCovariates

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "ndm.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
EVALUATING = ("validate", "test", "predict")
RETIRED_MODEL = "rmr_lightning.finetuning.FrozenProcessorFinetuning"


def wandb_logged_in() -> bool:
    """True when an API key is available (environment or ~/.netrc), without any network call."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def default_wandb_mode() -> None:
    """W&B runs offline unless the user logged in or chose ``WANDB_MODE`` themselves."""
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"


def _data_abstract_spec(datamodule: object) -> dict[str, Any] | None:
    """The datamodule's ``AbstractSpec`` as its plain dict (what hyperparameters and checkpoints hold)."""
    return datamodule.abstract_spec.to_dict() if isinstance(datamodule, HasAbstractSpec) else None


def _data_covariate_names(datamodule: object) -> list[str] | None:
    return datamodule.covariate_names if isinstance(datamodule, HasCovariates) else None


# Datamodule settings that decide what a voxel means to the encoder: a checkpoint is only valid under its own.
PREPROCESSING_KEYS = ("spacing", "shape", "modality", "ct_window", "patch_size")


def _check_preprocessing(checkpoint: dict[str, Any], data: Namespace | None, ckpt_path: str) -> None:
    """Refuse to validate, test or predict under other preprocessing than the checkpoint was fitted with
    (e.g. a fit-time ``--data.init_args.spacing=8`` forgotten at predict time gives wrong numbers silently)."""
    fitted = checkpoint.get("datamodule_hyper_parameters") or {}
    current = getattr(data, "init_args", None) or {}

    def plain(value: Any) -> Any:  # tuples in the checkpoint, lists in the config
        return list(value) if isinstance(value, (list, tuple)) else value

    differ = [
        f"--data.init_args.{key}={plain(fitted[key])} (now {plain(current[key])})"
        for key in PREPROCESSING_KEYS
        if key in fitted and key in current and plain(fitted[key]) != plain(current[key])
    ]
    if differ:
        raise ValueError(
            f"{ckpt_path} was fitted with other preprocessing than this run's data; pass "
            + ", ".join(differ)
            + " so the scans are prepared as the model saw them in training"
        )


def _check_model_class(class_path: str, config: Namespace, ckpt_path: str) -> None:
    """A checkpoint's hyperparameters may only name this run's model class or one of rmr_lightning's: a
    checkpoint from elsewhere must not choose code to import. Checkpoints of the model before its split
    into ``NaturalModel`` and ``NaturalFinetuning`` are refused with what to do."""
    if class_path == RETIRED_MODEL:
        raise checkpoints.CheckpointError(
            f"{ckpt_path} was written by {RETIRED_MODEL}, which is now rmr_lightning.finetuning.NaturalFinetuning "
            "with its arguments grouped (head, readout, graph, loss, lr_factors) and its weights under model.*; "
            "fit again with the current configs/natural/*.yaml"
        )
    configured = str(getattr(config.get("model"), "class_path", ""))
    if class_path != configured and not class_path.startswith("rmr_lightning."):
        raise checkpoints.CheckpointError(
            f"{ckpt_path}: its hyperparameters name the model class {class_path!r}, which is neither this run's "
            f"model ({configured or 'none given'}) nor one of rmr_lightning's; pass --model with that class if you "
            "trust it"
        )


ROOT_PLACEHOLDER = "{default_root_dir}"


def _fill_root(node: Any, root: str) -> Any:
    """``{default_root_dir}`` in any string of a (nested) config node becomes ``trainer.default_root_dir``,
    so one override (``--trainer.default_root_dir=...``) moves a run's artifact, checkpoints and logs."""
    if isinstance(node, str):
        return node.replace(ROOT_PLACEHOLDER, root)
    if isinstance(node, list):
        return [_fill_root(v, root) for v in node]
    if isinstance(node, dict):
        return {k: _fill_root(v, root) for k, v in node.items()}
    if isinstance(node, Namespace):
        for key, value in vars(node).items():
            setattr(node, key, _fill_root(value, root))
    return node


def _fill_roots(trainer: Namespace) -> None:
    """Expand environment variables in ``default_root_dir`` and fill it into the callbacks and logger."""
    if trainer.default_root_dir:  # e.g. results/sweeps/$WANDB_RUN_ID: the agent sets it for each run
        trainer.default_root_dir = os.path.expandvars(str(trainer.default_root_dir))
    root = str(trainer.default_root_dir or ".")
    trainer.callbacks = _fill_root(trainer.callbacks, root)
    trainer.logger = _fill_root(trainer.logger, root)


def _vet_checkpoint(subcommand: str, config: Namespace) -> None:
    """What a checkpoint given as ``ckpt_path`` must pass before any of its hyperparameters are used."""
    ckpt_path = config.get("ckpt_path")
    if subcommand in EVALUATING and ckpt_path == "best":
        _fill_roots(config.trainer)
        ckpt_path = config.ckpt_path = str(checkpoints.best_checkpoint(config.trainer.callbacks))
    if not ckpt_path or not Path(ckpt_path).is_file():
        return
    checkpoint = checkpoints.read_checkpoint(ckpt_path)
    if subcommand in EVALUATING:
        _check_preprocessing(checkpoint, config.get("data"), ckpt_path)
    class_path = (checkpoint.get("hyper_parameters") or {}).get("_class_path")
    if class_path:
        _check_model_class(class_path, config, ckpt_path)


def setup_data(datamodule: Any, trainer: Any, stage: str) -> None:
    """Validate and prepare the data before the trainer starts any logger.

    Lightning creates the loggers' experiments (a W&B run, a CSV folder) before ``datamodule.setup``, so a
    bad manifest would reach them; run here, its error (which names files) stays on the console and no run
    folder is made. Rank 0 only: it is the rank that logs, and the other ranks set up in Lightning's order.
    """
    if datamodule is None or rank_zero_only.rank != 0:
        return
    datamodule.trainer = trainer  # where a datamodule writes its report of skipped subjects
    datamodule.prepare_data()
    datamodule.setup(stage)


class RMRCLI(LightningCLI):
    """LightningCLI with the links that keep numbers from being typed twice, and W&B run resumption."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse the run's arguments (``cli_main`` always passes them, so ``rmr-study``'s own command line is
        never read), then vet the checkpoint ``ckpt_path`` names before LightningCLI reads its hyperparameters:
        ``best`` becomes the monitored best file, preprocessing must match the fit's, and a model class is
        only imported if it is the config's or one of rmr_lightning's."""
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            _vet_checkpoint(subcommand, self.config[subcommand])

    def before_instantiate_classes(self) -> None:
        """Expand environment variables in ``default_root_dir`` and fill ``{default_root_dir}`` in the callbacks
        and logger; ``fit --ckpt_path ...`` continues the W&B run the checkpoint was written by."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        _fill_roots(config.trainer)
        if "weights_only" in config:  # Lightning then loads the checkpoint without unpickling objects
            config.weights_only = True
        if self.subcommand != "fit" or not config.ckpt_path:
            return
        found = checkpoints.resolve(str(config.ckpt_path), config.trainer.callbacks)
        if found is None:
            return
        path, checkpoint = found
        config.ckpt_path = str(path)  # the intact file we read, not a damaged newer last.ckpt
        logger = config.trainer.logger
        run_id = checkpoint.get(WANDB_ID_KEY)
        if run_id and str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            logger.init_args.id = run_id
            logger.init_args.resume = "allow"

    def before_fit(self) -> None:
        setup_data(self.datamodule, self.trainer, "fit")

    def before_validate(self) -> None:
        setup_data(self.datamodule, self.trainer, "validate")

    def before_test(self) -> None:
        setup_data(self.datamodule, self.trainer, "test")

    def before_predict(self) -> None:
        setup_data(self.datamodule, self.trainer, "predict")

    def add_arguments_to_parser(self, parser) -> None:
        # The pretraining module's input layout comes from the datamodule's algorithm.
        parser.link_arguments(
            "data", "model.init_args.abstract_spec", compute_fn=_data_abstract_spec, apply_on="instantiate"
        )
        # The fine-tuning module reads covariates in the order the datamodule writes them.
        parser.link_arguments(
            "data", "model.init_args.covariate_names", compute_fn=_data_covariate_names, apply_on="instantiate"
        )


def _with_default_config(args: list[str]) -> list[str]:
    """``rmr fit`` alone pretrains the default processor: a subcommand without ``--config`` gets
    ``configs/pretrain/ndm.yaml`` (LightningCLI's ``default_config_files`` would also sit under every
    ``--config`` a user gives, mixing the pretraining settings into theirs)."""
    has_config = any(a == "--config" or a.startswith("--config=") for a in args)
    if args and args[0] in SUBCOMMANDS and not has_config and DEFAULT_CONFIG.is_file():
        return [args[0], "--config", str(DEFAULT_CONFIG), *args[1:]]
    return args


def cli_main(args: list[str] | None = None, run: bool = True) -> RMRCLI:
    """Entry point of ``rmr``; ``args`` lets tests drive the CLI in-process."""
    default_wandb_mode()
    # Lightning 2.6's pytree helper builds torch's deprecated LeafSpec on every batch: noise, not news
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    for entry in available_processors().values():  # third-party processors become resolvable by name
        entry.load()
    argv = _with_default_config(list(sys.argv[1:] if args is None else args))
    return RMRCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveAndLogConfig,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [RunIdentity()]},
        args=argv,
        run=run,
    )


def main() -> None:
    """Console script ``rmr`` (returns nothing, so the exit status is 0 on success)."""
    cli_main()


if __name__ == "__main__":
    main()
