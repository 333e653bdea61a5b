"""``rmr``: the LightningCLI of rmr_lightning (fit / validate / test / predict).

Models and data are chosen by ``class_path`` in YAML (jsonargparse imports what a config names), so
this file imports neither stage modules nor datamodules. Processors registered in the entry-point
group ``rmr_lightning.processors`` are imported first, so their class names resolve too.
"""

from __future__ import annotations

import importlib
import inspect
import netrc
import os
import sys
import warnings
from pathlib import Path

from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from processors.registry import available_processors
from rmr_lightning.logging import WANDB_ID_KEY, RunIdentity, SaveAndLogConfig

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "ndm.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


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


def _data_abstract_spec(datamodule) -> dict | None:
    return getattr(datamodule, "abstract_spec", None)


def _data_covariate_names(datamodule) -> list[str] | None:
    return getattr(datamodule, "covariate_names", None)


def _checkpoint_dirs(callbacks: list[Any]) -> list[Path]:
    """The ``dirpath`` folders of the config's ModelCheckpoint callbacks."""
    dirs = []
    for cb in callbacks or []:
        dirpath = getattr(getattr(cb, "init_args", None), "dirpath", None)
        if str(getattr(cb, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            dirs.append(Path(dirpath))
    return dirs


def _last_checkpoint(dirs: list[Path]) -> Path | None:
    """The newest ``last*.ckpt`` in ``dirs``."""
    found = [p for d in dirs for p in d.glob("last*.ckpt")]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _resolve_checkpoint(ckpt_path: str, callbacks: list[Any]) -> Path | None:
    """The file ``--ckpt_path`` names, with ``last`` looked up in the ModelCheckpoint folders of the config."""
    if ckpt_path not in ("last", "best", "hpc", "registry"):
        return Path(ckpt_path) if Path(ckpt_path).is_file() else None
    if ckpt_path != "last":
        return None
    return _last_checkpoint(_checkpoint_dirs(callbacks))


def _best_checkpoint(callbacks: list[Any]) -> Path:
    """``--ckpt_path best`` in a process that did not fit: Lightning knows the best checkpoint only in the
    fitting process, so read it from the ModelCheckpoint state saved in the folder's last checkpoint."""
    dirs = _checkpoint_dirs(callbacks)
    last = _last_checkpoint(dirs)
    if last is None:
        raise ValueError(
            f"--ckpt_path best: no last.ckpt in the checkpoint folders {[str(d) for d in dirs] or '(none configured)'} "
            "to read the best checkpoint from; fit first (with save_last), or pass the checkpoint file"
        )
    states = torch.load(last, map_location="cpu", weights_only=False).get("callbacks", {})
    best = [v.get("best_model_path") for k, v in states.items() if str(k).startswith("ModelCheckpoint") and isinstance(v, dict)]
    best = [Path(b) for b in best if b and Path(b).is_file()]
    if not best:
        raise ValueError(f"--ckpt_path best: {last} records no best checkpoint that still exists; pass the checkpoint file")
    return best[0]


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
            + ", ".join(differ) + " so the scans are prepared as the model saw them in training"
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


class RMRCLI(LightningCLI):
    """LightningCLI with the links that keep numbers from being typed twice, and W&B run resumption."""

    def _parse_ckpt_path(self) -> None:
        """As LightningCLI, but only with the checkpoint hyperparameters the model class accepts.

        The links above target arguments that only one stage module has; LightningCLI records the
        unused one in the checkpoint (as None) and would pass it back on ``test --ckpt_path``.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand in ("validate", "test", "predict") and ckpt_path == "best":
            config = self.config[subcommand]
            _fill_roots(config.trainer)
            ckpt_path = config.ckpt_path = str(_best_checkpoint(config.trainer.callbacks))
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        if subcommand in ("validate", "test", "predict"):
            _check_preprocessing(checkpoint, self.config[subcommand].get("data"), ckpt_path)
        hparams = checkpoint.get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        class_path = hparams.pop("_class_path", None)
        if not hparams or class_path is None:
            return super()._parse_ckpt_path()
        module_name, _, name = class_path.rpartition(".")
        accepted = inspect.signature(getattr(importlib.import_module(module_name), name)).parameters
        kwargs = {k: v for k, v in hparams.items() if k in accepted}
        self.config = self.parser.parse_object({subcommand: {"model": {"class_path": class_path, "dict_kwargs": kwargs}}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Expand environment variables in ``default_root_dir`` and fill ``{default_root_dir}`` in the callbacks
        and logger; ``fit --ckpt_path ...`` continues the W&B run the checkpoint was written by."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        _fill_roots(config.trainer)
        if self.subcommand != "fit":
            return
        logger = config.trainer.logger
        if not config.ckpt_path or not str(getattr(logger, "class_path", "")).endswith("WandbLogger"):
            return
        path = _resolve_checkpoint(str(config.ckpt_path), config.trainer.callbacks)
        if path is None:
            return
        run_id = torch.load(path, map_location="cpu", weights_only=False).get(WANDB_ID_KEY)
        if run_id:
            logger.init_args.id = run_id
            logger.init_args.resume = "allow"

    def add_arguments_to_parser(self, parser) -> None:
        # The pretraining module's input layout comes from the datamodule's algorithm.
        parser.link_arguments("data", "model.init_args.abstract_spec", compute_fn=_data_abstract_spec, apply_on="instantiate")
        # The fine-tuning module reads covariates in the order the datamodule writes them.
        parser.link_arguments("data", "model.init_args.covariate_names", compute_fn=_data_covariate_names, apply_on="instantiate")


def _with_default_config(args: list[str]) -> list[str]:
    if args and args[0] in SUBCOMMANDS and not any(a == "--config" or a.startswith("--config=") for a in args):
        if DEFAULT_CONFIG.is_file():
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
    # LightningCLI reads sys.argv itself and warns when it also gets ``args`` (as in rmr-study, whose own
    # command line is not the run's): hand it the run's arguments one way only.
    saved_argv = sys.argv[:]
    sys.argv[1:] = argv if args is None else []
    try:
        return RMRCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveAndLogConfig,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [RunIdentity()]},
            args=None if args is None else argv,
            run=run,
        )
    finally:
        if args is not None:
            sys.argv[:] = saved_argv


def main() -> None:
    """Console script ``rmr`` (returns nothing, so the exit status is 0 on success)."""
    cli_main()


if __name__ == "__main__":
    main()
