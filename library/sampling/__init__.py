"""Sample images during training, with sd-scripts' prompt files, samplers, cadence and file names."""

from library.sampling.flags import SampleFlags, add_sample_arguments
from library.sampling.generate import (
    Sample,
    SampleSettings,
    check_prompts,
    derived_seed,
    eval_mode,
    generate_image,
    preserved_rng,
    sample_file_name,
    sample_images,
    should_sample,
)
from library.sampling.hook import make_sample_hook
from library.sampling.prompts import SamplePrompt, line_to_prompt_dict, load_prompts, resolve_prompt
from library.sampling.samplers import SAMPLER_NAMES, make_sampler
from library.sampling.trackers import log_images_to_trackers

__all__ = [
    "SAMPLER_NAMES",
    "Sample",
    "SampleFlags",
    "SamplePrompt",
    "SampleSettings",
    "add_sample_arguments",
    "check_prompts",
    "derived_seed",
    "eval_mode",
    "generate_image",
    "line_to_prompt_dict",
    "load_prompts",
    "log_images_to_trackers",
    "make_sample_hook",
    "make_sampler",
    "preserved_rng",
    "resolve_prompt",
    "sample_file_name",
    "sample_images",
    "should_sample",
]
