"""Sweep the learning rate at every width under μP and SP, and report how far the optimal LR moves with width.

Trials are appended to <results dir>/lr_mup.csv and lr_sp.csv as they finish, and a rerun skips finished
trials. The optimum table goes to lr_summary.csv and the loss curves to lr_sweep.png.
"""

import argparse
import logging

from tqdm.contrib.logging import logging_redirect_tqdm

from mup_qwen.adaptive import format_searches, run_adaptive
from mup_qwen.cli import add_executor_args, executor_options, make_parser, run_main, settings_from_args, setup_logging
from mup_qwen.optimum import format_summary, summarize
from mup_qwen.settings import settings_from_dict
from mup_qwen.shapes import check_base_shapes_file
from mup_qwen.sweep import PLOT_FILE, SUMMARY_FILE, grid_keys, prepare_results_dir, read_trials, run_trials
from mup_qwen.sweep_plot import plot_lr_sweep

logger = logging.getLogger("mup_qwen")
STEPS_FIELD = "sweep.steps"


def parametrizations_arg(text: str) -> list[str]:
    names = [part.strip() for part in text.replace(",", " ").split()]
    if not names or any(name not in ("mup", "sp") for name in names):
        raise argparse.ArgumentTypeError(f"invalid parametrizations {text!r}: expected mup, sp or mup,sp")
    return list(dict.fromkeys(names))


def positive_octaves(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive number of octaves")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__, steps_field=STEPS_FIELD)
    add_executor_args(parser)
    parser.add_argument("--parametrizations", type=parametrizations_arg, default=["mup", "sp"],
                        help="parametrizations to sweep, e.g. mup,sp (default) or sp")
    parser.add_argument("--log2-lr-min", type=float, help="smallest log2 LR of the grid (sweep.log2_lr_min)")
    parser.add_argument("--log2-lr-max", type=float, help="largest log2 LR of the grid (sweep.log2_lr_max)")
    parser.add_argument("--num-lrs", type=int,
                        help="grid points from min to max, evenly spaced in log2 LR (sweep.num_lrs)")
    parser.add_argument("--search", choices=["grid", "adaptive"], default="grid",
                        help="grid: every point of the sweep.num_lrs grid (default); adaptive: a coarse grid, then "
                             "successive halving of the bracket around the best point until --tolerance")
    parser.add_argument("--coarse-step", type=positive_octaves, default=2.0,
                        help="adaptive search: spacing of the coarse grid in octaves (default: 2)")
    parser.add_argument("--tolerance", type=positive_octaves, default=0.25,
                        help="adaptive search: bracket half-width in octaves at which to stop (default: 0.25)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over: move the earlier sweep files of the results dir (CSVs, summary, plot, "
                             "settings record) into a new previous-<date>-<time> folder inside it; nothing is deleted")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    setup_logging(args.verbose)
    settings = settings_from_args(args, steps_field=STEPS_FIELD)
    grid = {"log2_lr_min": args.log2_lr_min, "log2_lr_max": args.log2_lr_max, "num_lrs": args.num_lrs}
    if any(value is not None for value in grid.values()):
        # The three fields are validated together, so a new range may lie wholly outside the old one.
        raw = settings.to_dict()
        raw["sweep"].update({name: value for name, value in grid.items() if value is not None})
        settings = settings_from_dict(raw)
    parametrizations = args.parametrizations
    if "mup" in parametrizations:
        check_base_shapes_file(settings, settings.run.base_shapes)
    results_dir = prepare_results_dir(settings, fresh=args.fresh)

    sweep = settings.sweep
    logger.info("LR sweep (%s): %s at widths %s, log2 LR %g to %g, seeds %s, %d steps per trial, results in %s",
                args.search, ", ".join(parametrizations), settings.model.widths, sweep.log2_lr_min, sweep.log2_lr_max,
                sweep.seeds, sweep.steps, results_dir)
    with logging_redirect_tqdm():
        if args.search == "grid":
            run_trials(settings, grid_keys(settings, parametrizations), executor_options(args))
        else:
            states = run_adaptive(settings, parametrizations, executor_options(args),
                                  coarse_step=args.coarse_step, tolerance=args.tolerance)

    trials = read_trials(results_dir, parametrizations)
    summary = summarize(trials, widths=settings.model.widths, seeds=sweep.seeds, parametrizations=parametrizations)
    summary.to_csv(results_dir / SUMMARY_FILE, index=False)
    plot_lr_sweep(trials[trials["width"].isin(settings.model.widths) & trials["seed"].isin(sweep.seeds)], summary,
                  results_dir / PLOT_FILE, parametrizations)

    if args.search == "adaptive":
        print(format_searches(states))
        print()
    print(format_summary(summary))
    print(f"\nwrote {results_dir / SUMMARY_FILE} and {results_dir / PLOT_FILE}")


if __name__ == "__main__":
    run_main(main)
