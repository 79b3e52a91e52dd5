"""The engine's sampling hook: render a ``SampleRequest`` with these settings and log the images."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from library.sampling.generate import Sample, SampleSettings, check_prompts, error_line, sample_images
from library.sampling.trackers import log_images_to_trackers

logger = logging.getLogger(__name__)


def make_sample_hook(settings: SampleSettings, accelerator: Any = None) -> Callable[[Any], list[Sample]]:
    """A ``TrainingParts.sample`` callable.

    The request (``library.engine.SampleRequest``: components, step, epoch, output_dir, device, accelerator)
    decides where and when; ``settings`` says what. With an accelerator (``accelerator`` here, else the
    request's) the model runs under its autocast and the images go to its trackers. The prompt file is read and
    checked here, so a bad file fails when the hook is made (at start-up), not at the first sample hours into
    training. Once training runs, a sample never stops it: a failure (any Exception; KeyboardInterrupt and
    SystemExit propagate) is logged as one warning and the hook returns the images it did make.
    """
    check_prompts(settings)

    def sample(request: Any) -> list[Sample]:
        acc = accelerator if accelerator is not None else getattr(request, "accelerator", None)
        try:
            samples = sample_images(
                request.components,
                for_request(settings, request),
                epoch=request.epoch,
                step=request.step,
                device=request.device,
                autocast=None if acc is None else acc.autocast,
            )
        except Exception as e:
            logger.warning("sample images at step %d failed: %s; training continues", request.step, error_line(e))
            return []
        if acc is not None and samples:
            try:
                log_images_to_trackers(
                    acc,
                    [s.image for s in samples],
                    [s.prompt.prompt for s in samples],
                    request.step,
                    indices=[s.prompt.index for s in samples],
                    suffix=for_request(settings, request).file_suffix,
                )
            except Exception as e:
                logger.warning(
                    "sample images at step %d not logged: %s; training continues", request.step, error_line(e)
                )
        return samples

    return sample


def for_request(settings: SampleSettings, request: Any) -> SampleSettings:
    """``settings`` writing to the request's output folder, with its variant (if any) in file names."""
    variant = getattr(request, "variant", "")
    return replace(settings, output_dir=request.output_dir, file_suffix=f"_{variant}" if variant else "")
