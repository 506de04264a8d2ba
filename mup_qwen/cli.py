"""Command-line plumbing shared by the scripts: common flags, overrides and clean exits."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Optional

from mup_qwen.settings import MupQwenError, Settings, load_settings, override


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s mup-qwen %(levelname)s: %(message)s", datefmt="%H:%M:%S")


def widths_arg(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid widths {text!r}: expected integers such as 64,128,256") from None


def make_parser(description: str, steps_field: Optional[str] = None) -> argparse.ArgumentParser:
    """Return a parser with the flags every script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="setting.yml", help="settings file (default: setting.yml)")
    parser.add_argument("--widths", type=widths_arg, help="hidden sizes to run, e.g. 64,128,256 (model.widths)")
    if steps_field:
        parser.add_argument("--steps", type=int, help=f"training steps per run ({steps_field})")
    parser.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], help="device (run.device)")
    parser.add_argument("--results-dir", help="folder for CSVs and plots (run.results_dir)")
    parser.add_argument("--base-shapes", help="base shapes file (run.base_shapes)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    return parser


def settings_from_args(args: argparse.Namespace, steps_field: Optional[str] = None) -> Settings:
    """Load `--config` and apply the command-line overrides, validating each one."""
    settings = load_settings(args.config)
    overrides = {
        "model.widths": args.widths,
        "run.device": args.device,
        "run.results_dir": args.results_dir,
        "run.base_shapes": args.base_shapes,
    }
    if steps_field:
        overrides[steps_field] = args.steps
    for dotted, value in overrides.items():
        if value is not None:
            settings = override(settings, dotted, value)
    return settings


def run_main(main: Callable[[], None]) -> None:
    """Run a script's `main`, turning known errors into one line on stderr and exit status 2."""
    try:
        main()
    except MupQwenError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: results written so far are kept; rerun to resume.", file=sys.stderr)
        sys.exit(130)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags that choose where trials run: in this process, in worker processes, or as Ray tasks."""
    parser.add_argument("--executor", choices=["local", "processes", "ray"], default="local",
                        help="run trials one after another in this process (local, default), in --workers "
                             "processes on this machine (processes), or as Ray tasks (ray)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for --executor processes (default: 2); set run.threads so that "
                             "workers × threads does not exceed the cores")
    parser.add_argument("--address", help="Ray cluster address to join (default: start a local instance)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs reserved per Ray task")
    parser.add_argument("--gpus-per-trial", type=float, default=0.0,
                        help="GPUs reserved per Ray task; fractions such as 0.25 pack trials on one GPU")


def executor_options(args: argparse.Namespace) -> dict:
    """Return the keyword arguments of `mup_qwen.executor.run_tasks` chosen on the command line."""
    return {"executor": args.executor, "workers": args.workers, "address": args.address,
            "cpus_per_trial": args.cpus_per_trial, "gpus_per_trial": args.gpus_per_trial}
