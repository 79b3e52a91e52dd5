"""The training loss with sd-scripts' semantics: element loss, masks, per-sample weights and SNR re-weighting.

Order, as in sd-scripts' train_network: element-wise loss (l2 | l1 | huber | smooth_l1, or OneTrainer's weighted
mix of mse/mae/log-cosh/huber) -> per-pixel mask (with OneTrainer's unmasked weight and probability) -> mean over
C, H, W (divided by the mask mean with normalize_masked_area_loss) -> per-sample weights (prior loss weight) ->
min-SNR gamma -> P2 -> scale v-pred like noise-pred -> v-pred-like loss -> debiased estimation -> mean over the batch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from library.errors import UserError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
SNR_CAP = 1000.0  # sd-scripts caps SNR here (it is ~1175 at t=0 for SD) in the v-pred scale and debiased weights
STRENGTH_TERMS = (
    ("mse_strength", "l2"),
    ("mae_strength", "l1"),
    ("log_cosh_strength", "log_cosh"),
    ("huber_strength", "huber"),
)


@dataclass(frozen=True)
class LossSettings:
    """How the loss is computed. Field names are the flags' names (``settings_from_flags`` reads them);
    ``v_parameterization`` is the loaded model's, given by the caller.

    ``masked_loss`` tells the dataset to provide masks; :func:`per_sample_loss` applies any mask it is given.
    Any ``*_strength`` given replaces ``loss_type`` by the weighted sum of those terms (unset ones count 0); the
    huber term is the ``--loss_type huber`` loss (``huber_c``/``huber_schedule``/``huber_scale``). P2 multiplies
    with min-SNR and debiased estimation when several are given. ``alpha_mask`` is the flag of that name, read only
    to tell whether the mask options can have any effect.
    """

    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    masked_loss: bool = False
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    mse_strength: float | None = None
    mae_strength: float | None = None
    log_cosh_strength: float | None = None
    huber_strength: float | None = None
    p2_loss_weight_gamma: float | None = None
    p2_loss_weight_k: float = 1.0
    unmasked_probability: float = 0.0
    unmasked_weight: float = 0.0
    normalize_masked_area_loss: bool = False
    alpha_mask: bool = False
    v_parameterization: bool = False

    def __post_init__(self) -> None:
        self._check_terms()
        self._check_mask_options()
        if self.loss_type not in LOSS_TYPES:
            raise UserError(f"--loss_type {self.loss_type!r} is unknown: use one of {', '.join(LOSS_TYPES)}")
        if self.huber_schedule not in HUBER_SCHEDULES:
            raise UserError(
                f"--huber_schedule {self.huber_schedule!r} is unknown: use one of {', '.join(HUBER_SCHEDULES)}"
            )
        if self.huber_c_needed and self.huber_c <= 0:
            raise UserError(f"--huber_c is {self.huber_c}: use a value above 0 (default 0.1)")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise UserError(f"--min_snr_gamma is {self.min_snr_gamma}: use a value above 0 (5 is typical)")
        if self.scale_v_pred_loss_like_noise_pred and not self.v_parameterization:
            raise UserError(
                "--scale_v_pred_loss_like_noise_pred works only with --v_parameterization: add it or drop the flag"
            )
        if self.v_pred_like_loss and self.v_parameterization:
            raise UserError("--v_pred_like_loss cannot be used with --v_parameterization: drop one of them")
        if self.p2_loss_weight_k <= 0:
            raise UserError(f"--p2_loss_weight_k is {self.p2_loss_weight_k}: use a value above 0 (default 1)")

    def _check_terms(self) -> None:
        given = [name for name, _ in STRENGTH_TERMS if getattr(self, name) is not None]
        if not given:
            return
        if self.loss_type != "l2":
            raise UserError(
                f"--loss_type {self.loss_type} and --{given[0]} both choose the loss: drop --loss_type "
                "(the *_strength flags give the whole mix) or the *_strength flags"
            )
        if any(getattr(self, name) < 0 for name in given):
            raise UserError(f"--{', --'.join(given)}: loss strengths must be 0 or more")
        if sum(getattr(self, name) for name in given) <= 0:
            raise UserError(f"--{', --'.join(given)} are all 0: give at least one loss a strength above 0")

    def _check_mask_options(self) -> None:
        if not 0 <= self.unmasked_probability <= 1:
            raise UserError(f"--unmasked_probability is {self.unmasked_probability}: use a value from 0 to 1")
        if not 0 <= self.unmasked_weight <= 1:
            raise UserError(f"--unmasked_weight is {self.unmasked_weight}: use a value from 0 to 1")
        used = [
            flag
            for flag, on in (
                ("--unmasked_probability", self.unmasked_probability > 0),
                ("--unmasked_weight", self.unmasked_weight > 0),
                ("--normalize_masked_area_loss", self.normalize_masked_area_loss),
            )
            if on
        ]
        if used and not (self.masked_loss or self.alpha_mask):
            logger.warning(
                "%s: only masked samples are affected, and neither --masked_loss nor --alpha_mask is given, so "
                "this has no effect unless the dataset TOML sets alpha_mask",
                ", ".join(used),
            )

    @property
    def terms(self) -> tuple[tuple[str, float], ...]:
        """The element losses summed and their strengths: ``((loss_type, 1.0),)`` when no strength is given."""
        mix = tuple((kind, getattr(self, name)) for name, kind in STRENGTH_TERMS if getattr(self, name))
        given = any(getattr(self, name) is not None for name, _ in STRENGTH_TERMS)
        return mix if given else ((self.loss_type, 1.0),)

    @property
    def huber_c_needed(self) -> bool:
        """Whether a term of the loss is huber or smooth_l1 (so the per-timestep Huber threshold is used)."""
        return any(kind in ("huber", "smooth_l1") for kind, _ in self.terms)


def snr_table(scheduler: DDPMScheduler) -> torch.Tensor:
    """Signal-to-noise ratio ``alpha_t^2 / sigma_t^2`` for every training timestep (sd-scripts' ``all_snr``)."""
    alphas_cumprod = scheduler.alphas_cumprod.cpu()
    return (torch.sqrt(alphas_cumprod) / torch.sqrt(1.0 - alphas_cumprod)) ** 2


def _snr_at(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    return snr_table(scheduler)[timesteps.cpu().long()].to(timesteps.device)


def huber_threshold(settings: LossSettings, timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor | None:
    """Per-sample Huber ``c`` for the huber / smooth_l1 losses, or None for l1 / l2.

    constant: ``c * scale``; exponential: ``scale * exp(ln(c) * t / T)`` (``scale`` at t=0, ``c * scale`` at t=T);
    snr: ``(1 - c) / (1 + sigma_t)^2 + c`` with ``sigma_t = sqrt((1 - a_t) / a_t)`` (no scale, as in sd-scripts).
    """
    if not settings.huber_c_needed:
        return None
    if settings.huber_schedule == "constant":
        return torch.full(timesteps.shape, settings.huber_c * settings.huber_scale, device=timesteps.device)
    if settings.huber_schedule == "exponential":
        alpha = -math.log(settings.huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * timesteps) * settings.huber_scale
    alphas_cumprod = scheduler.alphas_cumprod.cpu()[timesteps.cpu().long()]
    sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return ((1 - settings.huber_c) / (1 + sigmas) ** 2 + settings.huber_c).to(timesteps.device)


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Loss per element (no reduction).

    huber is ``2c(sqrt(d^2 + c^2) - c)`` and smooth_l1 is ``2(sqrt(d^2 + c^2) - c)`` with ``d = pred - target``.
    """
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in ("huber", "smooth_l1"):
        raise UserError(f"--loss_type {loss_type!r} is unknown: use one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type} needs per-sample huber_c (see huber_threshold)")
    c = huber_c.view(-1, *([1] * (pred.dim() - 1)))
    pseudo = torch.sqrt((pred - target) ** 2 + c**2) - c
    return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo


def log_cosh_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log(cosh(d))`` per element with ``d = pred - target``, computed as ``d + softplus(-2d) - log 2`` so large
    differences do not overflow."""
    diff = pred - target
    return diff + F.softplus(-2.0 * diff) - math.log(2.0)


def mixed_elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, settings: LossSettings, huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """The settings' loss per element: ``--loss_type``'s, or the strength-weighted sum of the mixed terms."""
    terms = settings.terms
    if len(terms) == 1 and terms[0][1] == 1.0:
        return _term(pred, target, terms[0][0], huber_c)
    total = torch.zeros_like(pred)
    for kind, strength in terms:
        total = total + strength * _term(pred, target, kind, huber_c)
    return total


def _term(pred: torch.Tensor, target: torch.Tensor, kind: str, huber_c: torch.Tensor | None) -> torch.Tensor:
    return log_cosh_loss(pred, target) if kind == "log_cosh" else elementwise_loss(pred, target, kind, huber_c)


def resize_mask(mask: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1], shape (B, H, W) or (B, 1, H, W) at any resolution, area-resized to the (B, C, H, W) loss'
    H x W as (B, 1, H, W) (sd-scripts' apply_masked_loss)."""
    mask = mask.to(device=loss.device, dtype=loss.dtype)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != loss.shape[0]:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W) for a loss of shape {tuple(loss.shape)}")
    return F.interpolate(mask, size=loss.shape[2:], mode="area")


def adjust_mask(mask: torch.Tensor, settings: LossSettings, generator: torch.Generator | None) -> torch.Tensor:
    """OneTrainer's masked-training options on a (B, 1, H, W) mask: ``unmasked_weight + (1 - unmasked_weight) *
    mask``, then each sample, with probability ``unmasked_probability`` (one uniform draw per sample from
    ``generator``), trains unmasked (its mask all ones)."""
    if settings.unmasked_weight > 0:
        mask = settings.unmasked_weight + (1 - settings.unmasked_weight) * mask
    if settings.unmasked_probability > 0:
        if generator is None:
            raise ValueError("unmasked_probability needs the step's generator")
        draws = torch.rand(mask.shape[0], generator=generator, device=generator.device, dtype=torch.float32)
        unmasked = (draws < settings.unmasked_probability).to(mask.device).view(-1, 1, 1, 1)
        mask = torch.where(unmasked, torch.ones_like(mask), mask)
    return mask


def mask_from_conditioning_image(images: torch.Tensor) -> torch.Tensor:
    """The red channel of (B, 3, H, W) images in [-1, 1] as a (B, 1, H, W) mask in [0, 1] (``--masked_loss``)."""
    return images[:, 0:1] / 2 + 0.5


def min_snr_weight(timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weights: ``min(snr, gamma) / snr`` (epsilon) or ``min(snr, gamma) / (snr + 1)`` (v).

    At zero SNR (zero-terminal-SNR schedules) the epsilon weight takes its limit 1 where sd-scripts gives NaN.
    """
    snr = _snr_at(timesteps, scheduler)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        return (clipped / (snr + 1)).float()
    return torch.where(snr > 0, clipped / snr, torch.ones_like(snr)).float()


def v_pred_scale(timesteps: torch.Tensor, scheduler: DDPMScheduler) -> torch.Tensor:
    """``snr / (snr + 1)`` with SNR capped at 1000: turns a v-prediction loss into a noise-prediction one."""
    snr = torch.clamp(_snr_at(timesteps, scheduler), max=SNR_CAP)
    return snr / (snr + 1)


def debiased_weight(timesteps: torch.Tensor, scheduler: DDPMScheduler, v_prediction: bool) -> torch.Tensor:
    """Debiased estimation weights, SNR capped at 1000: ``1 / sqrt(snr)`` (epsilon) or ``1 / (snr + 1)`` (v)."""
    snr = torch.clamp(_snr_at(timesteps, scheduler), max=SNR_CAP)
    return 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)


def p2_weight(
    timesteps: torch.Tensor, scheduler: DDPMScheduler, gamma: float, k: float, v_prediction: bool
) -> torch.Tensor:
    """P2 weights (Choi et al. 2022) ``(k + snr)^-gamma``; for v-prediction ``snr + 1`` stands for ``snr``, as
    OneTrainer does (its P2 is ``k = 1`` with gamma = loss_weight_strength)."""
    snr = _snr_at(timesteps, scheduler)
    if v_prediction:
        snr = snr + 1.0
    return ((k + snr) ** -gamma).float()


def reweight_per_sample(
    loss: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler, settings: LossSettings
) -> torch.Tensor:
    """Apply the timestep-dependent re-weightings to a (B,) loss, in sd-scripts' order."""
    if settings.min_snr_gamma:
        loss = loss * min_snr_weight(timesteps, scheduler, settings.min_snr_gamma, settings.v_parameterization).to(
            loss.device
        )
    if settings.p2_loss_weight_gamma:
        weight = p2_weight(
            timesteps, scheduler, settings.p2_loss_weight_gamma, settings.p2_loss_weight_k, settings.v_parameterization
        )
        loss = loss * weight.to(loss.device)
    if settings.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_scale(timesteps, scheduler).to(loss.device)
    if settings.v_pred_like_loss:
        loss = loss + loss / v_pred_scale(timesteps, scheduler).to(loss.device) * settings.v_pred_like_loss
    if settings.debiased_estimation_loss:
        loss = loss * debiased_weight(timesteps, scheduler, settings.v_parameterization).to(loss.device)
    return loss


def per_sample_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    settings: LossSettings,
    loss_weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The (B,) loss before the batch mean, computed in float32; ``generator`` (the step's) draws the samples
    trained unmasked under ``unmasked_probability``."""
    huber_c = huber_threshold(settings, timesteps, scheduler)
    loss = mixed_elementwise_loss(pred.float(), target.float(), settings, huber_c)
    dims = list(range(1, loss.dim()))
    if mask is not None:
        mask = adjust_mask(resize_mask(mask, loss), settings, generator)
        loss = loss * mask
    loss = loss.mean(dim=dims)
    if mask is not None and settings.normalize_masked_area_loss:
        area = mask.mean(dim=dims)
        loss = torch.where(area > 0, loss / area.clamp_min(torch.finfo(area.dtype).tiny), torch.zeros_like(loss))
    if loss_weights is not None:
        loss = loss * loss_weights.to(device=loss.device, dtype=loss.dtype)
    return reweight_per_sample(loss, timesteps, scheduler, settings)
