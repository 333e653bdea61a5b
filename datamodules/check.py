"""Vet a manifest before a cluster job: every check of the manifest datamodule, voxels included, no training.

    rmr-data check scans.csv
    rmr-data check scans.csv --config configs/natural/manifest.yaml --spacing 2 --shape [96,112,96]
    rmr-data check scans.csv --columns.label_scheme aparc+aseg --loader.num_workers 4

Reads the datamodule's options from a natural config's ``data.init_args`` (``--config``), then from
flags named as the datamodule's arguments (values in YAML syntax); a grouped argument takes a flag per
field (``--columns.targets [a,b]``, as ``--data.init_args.columns.targets`` of ``rmr``) or a mapping
(``--columns '{targets: [a, b]}'``). Checks every row's cells and file
headers, then reads every scan once into the preprocessing cache, checking its voxels, so a later
``rmr fit`` with the same preprocessing decodes nothing again. Prints one line per problem (subject,
column, file, what is wrong) and a summary; exits 0 only when the manifest is usable as configured.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rich.console import Console

from datamodules.manifest import ManifestDataModule, ManifestError
from rmr_lightning.files import atomic_write_csv

_SKIP = {"self", "manifest", "predict_manifest"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="the CSV manifest to check")
    parser.add_argument("--config", help="a natural config whose data.init_args set the datamodule's options")
    parser.add_argument(
        "--report", help="also write the problems as CSV here (pseudonyms, paths relative to the manifest)"
    )
    for name, param in inspect.signature(ManifestDataModule.__init__).parameters.items():
        if name in _SKIP:
            continue
        group = dataclasses.is_dataclass(param.default)
        default = dataclasses.asdict(param.default) if group else param.default
        parser.add_argument(f"--{name}", type=yaml.safe_load, default=argparse.SUPPRESS, help=f"default {default!r}")
        for field in dataclasses.fields(param.default) if group else ():
            parser.add_argument(
                f"--{name}.{field.name}",
                type=yaml.safe_load,
                default=argparse.SUPPRESS,
                help=f"default {default[field.name]!r}",
            )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """Datamodule options: the config's ``data.init_args``, then the flags given (a grouped argument's fields
    are merged into what the config gave it)."""
    options: dict[str, Any] = {}
    if args.config:
        data = (yaml.safe_load(Path(args.config).read_text()) or {}).get("data") or {}
        options.update(data.get("init_args") or {})
    accepted = set(inspect.signature(ManifestDataModule.__init__).parameters) - {"self"}
    for key, value in vars(args).items():
        name, _, field = key.partition(".")
        if name not in accepted or name in _SKIP:
            continue
        given = options.get(name)
        if field:
            options[name] = {**(given if isinstance(given, dict) else {}), field: value}
        elif isinstance(given, dict) and isinstance(value, dict):
            options[name] = {**given, **value}
        else:
            options[name] = value
    options.pop("predict_manifest", None)
    return {k: v for k, v in options.items() if k in accepted}


def run(args: argparse.Namespace) -> int:
    console = Console(highlight=False, soft_wrap=True)
    options = _options(args)
    options["manifest"] = args.manifest
    try:
        datamodule = ManifestDataModule(**options)
    except (TypeError, ValueError) as e:
        console.print(f"[red]invalid options:[/] {e}")
        return 2
    start = time.perf_counter()
    try:
        checks, problems = datamodule.inspect(args.manifest)
    except ManifestError as e:  # the manifest as a whole (unreadable, columns missing, no rows)
        console.print(f"[red]{e}[/]")
        return 1
    seconds = time.perf_counter() - start
    bad = [c for c in checks if c.issues]
    for line in problems + [m for c in bad for m in c.messages()]:
        console.print(line, markup=False)
    if args.report:
        folder = Path(args.manifest).resolve().parent
        atomic_write_csv(
            args.report, pd.DataFrame([r for c in bad for r in c.records(folder)], columns=_REPORT_COLUMNS)
        )
    usable = len(checks) - len(bad)
    ok = not problems and usable > 0 and (not bad or datamodule.hparams.on_bad_subject == "skip")
    verdict = "[green]usable[/]" if ok else "[red]not usable[/]"
    skip = (
        " (on_bad_subject: skip leaves them out)"
        if bad and ok
        else " (fix them, or set on_bad_subject: skip)"
        if bad
        else ""
    )
    console.print(
        f"{len(checks)} rows: {usable} usable, {len(bad)} with problems{skip}; "
        f"{len(problems)} manifest-wide problem(s); checked in {seconds:.1f} s: {verdict}"
    )
    return 0 if ok else 1


_REPORT_COLUMNS = ["line", "subject_id", "column", "file", "problem"]
