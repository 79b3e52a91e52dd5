"""Sampler names (sd-scripts' ``--sample_sampler`` / ``--ss``) mapped to diffusers schedulers.

Each scheduler is built the way sd-scripts builds it (the model's noise schedule, the class defaults otherwise,
and the model's prediction type) except for ``clip_sample``, which follows the model's schedule (off for every SD
checkpoint) where sd-scripts forces it on: clipping the predicted clean *latents* to [-1, 1] washes out colours
(latents are not pixels; diffusers, A1111 and ComfyUI never clip them). Two names sd-scripts documents but rejects
(``dpm++_2m_karras``, ``dpm++_2m_sde_karras``) are supported here.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import diffusers
from diffusers import SchedulerMixin

from library.errors import UserError

PNDM_MIN_PRK_STEPS = 4
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")

_DPM_PP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
_DPM_PP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}

SAMPLERS: Mapping[str, tuple[str, Mapping[str, Any]]] = MappingProxyType(
    {
        "ddim": ("DDIMScheduler", {}),
        "pndm": ("PNDMScheduler", {}),
        "lms": ("LMSDiscreteScheduler", {}),
        "euler": ("EulerDiscreteScheduler", {}),
        "euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "heun": ("HeunDiscreteScheduler", {}),
        "dpm_2": ("KDPM2DiscreteScheduler", {}),
        "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
        "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
        "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
        "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
        "k_lms": ("LMSDiscreteScheduler", {}),
        "k_euler": ("EulerDiscreteScheduler", {}),
        "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
        "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
        "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
        "dpm++_2m_karras": ("DPMSolverMultistepScheduler", _DPM_PP_2M),
        "dpm++_2m_sde_karras": ("DPMSolverMultistepScheduler", _DPM_PP_2M_SDE),
    }
)
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)


def unknown_sampler_message(name: object) -> str:
    """The sampler name as given (cut to 80 characters, on one line) and the names that are valid."""
    shown = " ".join(repr(name).split())
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return f"unknown sampler {shown}; valid samplers: {', '.join(SAMPLER_NAMES)}"


def check_sampler_name(name: object, where: str) -> str:
    """Return ``name`` if it is a known sampler, else raise a UserError that says ``where`` it came from."""
    if not isinstance(name, str) or name not in SAMPLERS:
        raise UserError(f"{where}: {unknown_sampler_message(name)}")
    return name


def make_sampler(
    name: str, schedule: Mapping[str, Any], prediction_type: str = "epsilon", steps: int | None = None
) -> SchedulerMixin:
    """A fresh diffusers scheduler for sampler ``name`` (schedulers keep per-run state, so never share one).

    ``schedule`` holds the noise-schedule keys (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``), e.g. the model's training scheduler's config; other keys are ignored. PNDM's Runge-Kutta
    warm-up needs 4 steps; for fewer ``steps`` it is skipped (sd-scripts fails there).
    """
    if name not in SAMPLERS:
        raise UserError(f"--sample_sampler: {unknown_sampler_message(name)}")
    class_name, extra = SAMPLERS[name]
    cls = getattr(diffusers, class_name)
    kwargs: dict[str, Any] = {key: schedule[key] for key in SCHEDULE_KEYS if key in schedule}
    kwargs.update(extra)
    kwargs["prediction_type"] = prediction_type
    if "clip_sample" in inspect.signature(cls.__init__).parameters:
        kwargs["clip_sample"] = bool(schedule.get("clip_sample", False))
    if class_name == "PNDMScheduler" and steps is not None and steps < PNDM_MIN_PRK_STEPS:
        kwargs["skip_prk_steps"] = True
    return cls(**kwargs)
