"""The engine's sampling hook: render a ``SampleRequest`` with these settings and log the images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from library.sampling.generate import Sample, SampleSettings, check_prompts, sample_images
from library.sampling.trackers import log_images_to_trackers


def make_sample_hook(settings: SampleSettings, accelerator: Any = None) -> Callable[[Any], list[Sample]]:
    """A ``TrainingParts.sample`` callable.

    The request (``library.engine.SampleRequest``: components, step, epoch, output_dir, device) decides where and
    when; ``settings`` says what. With an ``accelerator`` the model runs under its autocast and the images go to its
    trackers. The prompt file is read and checked here, so a bad file fails when the hook is made (at start-up),
    not at the first sample hours into training.
    """
    check_prompts(settings)

    def sample(request: Any) -> list[Sample]:
        samples = sample_images(
            request.components,
            replace(settings, output_dir=request.output_dir),
            epoch=request.epoch,
            step=request.step,
            device=request.device,
            autocast=None if accelerator is None else accelerator.autocast,
        )
        if accelerator is not None:
            images = [s.image for s in samples]
            log_images_to_trackers(accelerator, images, [s.prompt.prompt for s in samples], request.step)
        return samples

    return sample
