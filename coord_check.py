"""Run the μP coordinate check: train every width for a few steps under μP and SP, record each
module's activation size, and judge whether μP keeps it independent of width.
"""

import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the script only writes PNG files

import matplotlib.pyplot as plt  # noqa: E402

from mup_qwen.cli import (  # noqa: E402
    add_executor_args, executor_options, make_parser, run_main, settings_from_args, setup_logging,
)
from mup_qwen.coord import MUP_MISTAKES, check_coord_settings, run_coord_check  # noqa: E402
from mup_qwen.coord_verdict import DEFAULT_BOUNDS, fit_slopes  # noqa: E402
from mup_qwen.coord_plot import format_verdict, plot_coord, plot_slopes  # noqa: E402
from mup_qwen.settings import Settings  # noqa: E402
from mup_qwen.train import resolve_device  # noqa: E402

logger = logging.getLogger("mup_qwen")


def modules_arg(text: str) -> list[str]:
    return [part for part in text.replace(",", " ").split() if part]


def describe_check(settings: Settings) -> str:
    coord = settings.coord
    return (f"device {resolve_device(settings.run.device)}, {settings.model.family}, widths {settings.model.widths}, "
            f"{coord.steps} steps, seeds {coord.seeds}, {settings.optim.optimizer} at LR 2^{coord.log2_lr:g}, "
            f"batch {coord.batch_size} x {settings.data.seq_len} tokens")


def main() -> None:
    parser = make_parser(__doc__, steps_field="coord.steps")
    add_executor_args(parser)
    parser.add_argument("--modules", type=modules_arg,
                        help="module types to record and judge, comma-separated, e.g. q_proj,attn_logits,lm_head "
                             "(default: all)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when any module type fails the check under μP")
    parser.add_argument("--mistake", choices=sorted(MUP_MISTAKES),
                        help="break one μP rule in the μP models to see the check catch it. attention_scale keeps "
                             "1/sqrt(head_dim), which only differs under head_scaling fixed_heads. readout drops the "
                             "division by the width multiplier. hidden_init draws hidden matrices from "
                             "N(0, init_std). Results go to the folder mistake_<name> inside the results folder.")
    args = parser.parse_args()
    setup_logging(args.verbose)
    settings = settings_from_args(args, steps_field="coord.steps")
    module_types = check_coord_settings(settings, args.modules)
    results_dir = Path(settings.run.results_dir)
    model_transform = None
    if args.mistake:
        results_dir = results_dir / f"mistake_{args.mistake}"
        model_transform = MUP_MISTAKES[args.mistake]
        logger.info("μP models get the mistake %r: %s", args.mistake, model_transform.__doc__.splitlines()[0])

    logger.info("coordinate check: %s", describe_check(settings))
    frames, verdict = run_coord_check(settings, module_types=module_types, model_transform=model_transform,
                                      executor_options=executor_options(args), results_dir=results_dir)

    for parametrization, frame in frames.items():
        name = "μP" if parametrization == "mup" else "SP"
        figure = plot_coord(frame, title=f"{name} coordinate check: mean |activation| against width",
                            path=results_dir / f"coord_{parametrization}.png")
        plt.close(figure)
    slopes = {parametrization: fit_slopes(frame) for parametrization, frame in frames.items()}
    plt.close(plot_slopes(slopes, highest=DEFAULT_BOUNDS[1], path=results_dir / "coord_slopes.png"))

    print(format_verdict(verdict))
    total = len(verdict)
    mup_failed = verdict.loc[~verdict["mup_passed"].astype(bool), "module_type"].tolist()
    sp_failed = verdict.loc[~verdict["sp_passed"].astype(bool), "module_type"].tolist()
    if mup_failed:
        print(f"μP: FAIL ({total - len(mup_failed)} of {total} module types within bounds: failed "
              f"{', '.join(mup_failed)})")
    else:
        print(f"μP: pass ({total} of {total} module types within bounds)")
    if sp_failed:
        print(f"SP: {total - len(sp_failed)} of {total} module types within bounds, outside: {', '.join(sp_failed)}")
    else:
        print(f"SP: {total} of {total} module types within bounds, like μP")
    logger.info("wrote coord_mup.csv, coord_sp.csv, coord_verdict.csv, coord_mup.png, coord_sp.png and "
                "coord_slopes.png to %s", results_dir)

    if args.strict and mup_failed:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
