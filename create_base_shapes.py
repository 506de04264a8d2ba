"""Write the base shapes file that `mup.set_base_shapes` needs for every μP model of these settings."""

import logging

from mup_qwen.cli import make_parser, run_main, settings_from_args, setup_logging
from mup_qwen.shapes import make_base_shapes

logger = logging.getLogger("mup_qwen")


def main() -> None:
    parser = make_parser(__doc__)
    args = parser.parse_args()
    setup_logging(args.verbose)
    settings = settings_from_args(args)

    base_shapes = make_base_shapes(settings)
    model = settings.model
    infinite = sum(1 for shape in base_shapes.values() if shape.ninf() > 0)
    logger.info("wrote %s: %s, %d layers, base width %d (delta %d), %d parameters, %d with a width dimension",
                settings.run.base_shapes, model.family, model.num_layers, model.base_width,
                2 * model.base_width, len(base_shapes), infinite)


if __name__ == "__main__":
    run_main(main)
