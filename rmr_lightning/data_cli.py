"""``rmr-data``: get a cohort in before any training: vet a manifest, build one from BIDS, write phantoms.

    rmr-data check MANIFEST [--config NATURAL.yaml] [--OPTION VALUE ...] [--report CSV]
    rmr-data bids DATASET [--derivatives DIR] -o MANIFEST
    rmr-data phantoms OUT --subjects N --spacing MM [--seed S] [--modality mri|ct]

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status), so a new one is a new module and a line here. Only the chosen subcommand's module is imported
(``check`` pulls in Lightning, seconds that ``bids`` and ``--help`` need not pay).
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module, one-line help); the module's docstring is the subcommand's full description.
SUBCOMMANDS = {
    "check": ("datamodules.check", "vet a manifest before a cluster job: every check, voxels included, no training"),
    "bids": (
        "datamodules.bids",
        "build a manifest from a longitudinal BIDS dataset with FreeSurfer/FastSurfer outputs",
    ),
    "phantoms": (
        "datamodules.phantom_dataset",
        "write brain phantoms as a BIDS dataset with FreeSurfer-like outputs and the truth",
    ),
}


def parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The command line, with the arguments of ``chosen`` only (its module the only one imported)."""
    top = argparse.ArgumentParser(prog="rmr-data", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module_name, help_line) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_line, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:
            module = importlib.import_module(module_name)
            sub.description = module.__doc__
            module.add_arguments(sub)
            sub.set_defaults(run=module.run)
    return top


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else list(args)
    chosen = next((a for a in args if not a.startswith("-")), None)
    parsed = parser(chosen if chosen in SUBCOMMANDS else None).parse_args(args)
    return int(parsed.run(parsed) or 0)


def console() -> None:
    """Console script ``rmr-data``: exits with the subcommand's status."""
    sys.exit(main())


if __name__ == "__main__":
    console()
