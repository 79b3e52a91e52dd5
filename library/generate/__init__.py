"""gen_img.py: images from a model with LoRA-family files, sd-scripts' flags, and X/Y grids for picking an epoch."""

from library.generate.flags import GenSettings, refuse_unsupported, settings_from_args, setup_parser
from library.generate.run import GenReport, generate

__all__ = ["GenReport", "GenSettings", "generate", "refuse_unsupported", "settings_from_args", "setup_parser"]
