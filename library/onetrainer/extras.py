"""OneTrainer's EMA, validation and per-part training windows -> our ``ema*``, ``validate_every_n_*`` and
``*_train_until`` flags (semantics read from OneTrainer's ``EMAModule.py``, ``GenericTrainer.py``,
``TimedActionMixin.py`` and ``BaseModelSetup.py`` at commit 23df383)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from library.onetrainer.mapping import CADENCE, MINUTES

if TYPE_CHECKING:
    from library.onetrainer.mapping import Mapper

EMA_DEVICES = {"GPU": "same", "CPU": "cpu"}
WINDOW_UNITS = {"STEP": "steps", "EPOCH": "epochs"}


def map_ema(m: Mapper) -> None:
    """``ema`` GPU/CPU -> ``ema = true`` with ``ema_device`` same/cpu, ``ema_decay``, ``ema_update_every``. Both use
    the (1+t)/(10+t) warm-up capped at the decay; OneTrainer's default ``non_ema_sampling`` (samples with and without
    EMA) is a difference line, as we sample one set of weights."""
    mode, decay, every = m.get("ema"), m.get("ema_decay"), m.get("ema_update_step_interval")
    non_ema_sampling = m.get("non_ema_sampling")
    if mode == "OFF":
        return
    if mode not in EMA_DEVICES:
        m.unmapped("ema", "no such EMA mode (OFF, GPU and CPU are); no EMA is kept")
        return
    m.set("ema", "ema", True)
    m.set("ema", "ema_device", EMA_DEVICES[mode])
    m.set("ema", "ema_decay", float(decay))
    m.set("ema", "ema_update_every", int(every))
    if non_ema_sampling and m.config.samples:
        m.approx(
            "non_ema_sampling",
            "samples show the EMA weights only (OneTrainer adds a second set without EMA); add "
            "sample_without_ema = true to sample the trained weights instead",
        )


def validation_concepts(m: Mapper) -> int:
    """How many enabled concepts are of type VALIDATION (OneTrainer validates on those and only those)."""
    return sum(1 for c in m.config.concepts if c.get("enabled", True) and c.get("type") == "VALIDATION")


def map_validation(m: Mapper) -> str | None:
    """``validate_after`` in epochs/steps (ALWAYS: every step) -> ``validate_every_n_epochs/steps``. None when
    OneTrainer would validate (its VALIDATION concepts become ``is_val`` subsets), else why they are left out."""
    on, after, unit = m.get("validation"), m.get("validate_after"), m.get("validate_after_unit")
    if not on:
        return "left out: validation is off in OneTrainer (validation = false)"
    if not validation_concepts(m):
        m.unmapped(
            "validation",
            "no enabled concept of type VALIDATION, so nothing to validate on (OneTrainer validates only on those); "
            "validation_split in the dataset TOML holds out part of a subset instead",
        )
        return None
    shown = f"{after} {unit}"
    if unit == "ALWAYS":
        m.set("validation", "validate_every_n_steps", 1)
    elif unit in CADENCE and after and int(after) > 0:
        m.set("validation", f"validate_every_n_{CADENCE[unit]}", int(after))
    elif unit in MINUTES and after and float(after) > 0:
        m.unmapped(
            "validate_after",
            f"validation on the clock ({unit.lower()}s) is not supported: set validate_every_n_steps or "
            "validate_every_n_epochs; the VALIDATION concepts are written as is_val subsets",
            shown,
        )
    else:
        return f"left out: OneTrainer never validates (validate_after = {shown})"
    return None


def _window(m: Mapper, part: str) -> str | None:
    """``"<N>steps"``/``"<N>epochs"`` for a part trained for its first N steps/epochs; None when it trains
    throughout (NEVER) or the window cannot be expressed (listed)."""
    unit, after = m.get(f"{part}.stop_training_after_unit"), m.get(f"{part}.stop_training_after")
    if unit == "NEVER" or after is None:
        return None
    shown = f"{after} {unit}"
    if unit in WINDOW_UNITS and int(after) > 0:
        return f"{int(after)}{WINDOW_UNITS[unit]}"
    if unit in WINDOW_UNITS or unit == "ALWAYS":
        m.unmapped(f"{part}.stop_training_after", "OneTrainer never trains the part: turn its training off", shown)
    else:
        m.unmapped(
            f"{part}.stop_training_after",
            f"a training window on the clock ({unit.lower()}s) is not supported: ours counts steps or epochs",
            shown,
        )
    return None


def map_windows(m: Mapper, unet_train: bool, encoders: list[tuple[str, bool]]) -> None:
    """``unet.stop_training_after`` -> ``unet_train_until``; the trained text encoders' windows ->
    ``text_encoder_train_until`` (one for both SDXL encoders: the first set one, a difference line when they differ)."""
    for part in ("unet", *(p for p, _ in encoders)):
        m.get(f"{part}.stop_training_after_unit")
        m.get(f"{part}.stop_training_after")
    if unet_train:
        window = _window(m, "unet")
        if window:
            m.set("training", "unet_train_until", window)
    windows = [(part, _window(m, part)) for part, train in encoders if train]
    chosen = next((w for _, w in windows if w), None)
    if chosen:
        m.set("training", "text_encoder_train_until", chosen)
    if len({w for _, w in windows}) > 1:
        m.approx(
            "text_encoder_2.stop_training_after",
            f"one text_encoder_train_until for both encoders: {chosen} (text_encoder's: "
            f"{windows[0][1] or 'throughout'}, text_encoder_2's: {windows[1][1] or 'throughout'})",
        )


def note_hub_token(m: Mapper) -> None:
    """OneTrainer's only Hub setting is its login token (for downloading gated models; it has no upload settings):
    listed without its value, never copied into a file."""
    if m.config.given.get("secrets.huggingface_token"):
        m.out.unmapped.append(
            "secrets.huggingface_token = (hidden): not copied (OneTrainer logs in with it to download gated models): "
            "run `huggingface-cli login` or set HF_TOKEN; our huggingface_token is for uploads to huggingface_repo_id"
        )
