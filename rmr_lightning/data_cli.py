"""``rmr-data``: get a cohort in before any training: vet a manifest, build one from BIDS, write phantoms.

    rmr-data check MANIFEST [--config NATURAL.yaml] [--data.OPTION VALUE ...]
    rmr-data bids DATASET [--derivatives DIR] -o MANIFEST
    rmr-data phantoms OUT --subjects N --spacing MM [--seed S] [--modality mri|ct]

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int`` (the exit
status), so a new one is a new module and a line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "check": "datamodules.check",
    "bids": "datamodules.bids",
    "phantoms": "datamodules.phantom_dataset",
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="rmr-data", description=__doc__.splitlines()[0])
    commands = top.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def main(args: list[str] | None = None) -> int:
    parsed = parser().parse_args(args)
    return int(parsed.run(parsed) or 0)


def console() -> None:
    """Console script ``rmr-data``: exits with the subcommand's status."""
    sys.exit(main())


if __name__ == "__main__":
    console()
