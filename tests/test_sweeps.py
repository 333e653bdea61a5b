"""W&B sweep YAMLs: the agent's expansion of ``command`` gives a valid ``rmr`` run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

from tests.helpers import REPO, TINY_PRETRAIN, rmr, tiny_natural


def sample_values(parameters: dict) -> dict:
    """One value per parameter, as a sweep controller might pick it."""
    picked = {}
    for name, spec in parameters.items():
        if "value" in spec:
            picked[name] = spec["value"]
        elif "values" in spec:
            picked[name] = spec["values"][-1]
        else:
            picked[name] = spec["min"]
    return picked


def expand(sweep: dict, values: dict) -> list[str]:
    """The command list the W&B agent runs (``wandb/wandb_agent.py``: macros, then ``${args}``)."""
    command = {"args": {k: {"value": v} for k, v in values.items()}, "program": sweep.get("program")}
    sweep_command = create_sweep_command(list(sweep["command"]))
    sweep_vars = create_sweep_command_args(command)
    sweep_vars.update(interpreter=["python"], program=[command["program"]], env=["/usr/bin/env"])
    expanded: list[str] = []
    for chunk in map(str, sweep_command):
        if chunk.startswith("${") and chunk.endswith("}"):
            expanded += sweep_vars.get(chunk[2:-1]) or []
        else:
            expanded.append(chunk)
    return expanded


@pytest.mark.slow  # a subprocess run or a full fit: minutes with the rest on 2 cores
@pytest.mark.parametrize("name", ["pretrain", "natural"])
def test_sweep_command_runs_with_fast_dev_run(name: str, tiny_artifact: Path, tmp_path: Path) -> None:
    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / f"{name}.yaml").read_text())
    values = sample_values(sweep["parameters"])
    command = expand(sweep, values)
    assert command[:3] == ["/usr/bin/env", "rmr", "fit"]
    assert all(f"--{k}={v}" in command for k, v in values.items())
    extra = TINY_PRETRAIN if name == "pretrain" else tiny_natural(tiny_artifact)
    if name == "pretrain":
        extra = [a for a in extra if not a.startswith("--model.init_args.hidden_dim")]  # the sweep sets it
    result = rmr(
        [
            *command[2:],
            *extra,
            "--trainer.fast_dev_run=true",
            "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        env={"WANDB_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fast_dev_run" in result.stderr + result.stdout


@pytest.mark.parametrize("name", ["pretrain", "natural"])
def test_each_sweep_run_writes_into_its_own_folder(
    name: str, tiny_artifact: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Agents run in parallel (one per GPU): the command roots every output at the run the agent started."""
    from rmr_lightning.cli import cli_main

    sweep = yaml.safe_load((REPO / "configs" / "sweeps" / f"{name}.yaml").read_text())
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", f"run-{name}")
    extra = TINY_PRETRAIN if name == "pretrain" else tiny_natural(tiny_artifact)
    cli = cli_main([*expand(sweep, sample_values(sweep["parameters"]))[3:], *extra], run=False)
    root = Path("results/sweeps") / name / "sw1" / f"run-{name}"
    assert Path(cli.trainer.default_root_dir) == root
    assert Path(cli.trainer.logger.save_dir) == root
    dirs = [
        Path(cb.dirpath).resolve() for cb in cli.trainer.callbacks if getattr(cb, "dirpath", None)
    ]  # artifact (pretraining) and checkpoints
    assert all(d == root.resolve() or root.resolve() in d.parents for d in dirs) and len(dirs) == (
        2 if name == "pretrain" else 1
    )
