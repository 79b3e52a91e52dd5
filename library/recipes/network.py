"""The recipe of ``train_network.py``: a LoRA-family network from ``--network_module`` (sd-scripts' interface).

Any module with ``create_network`` / ``create_network_from_weights`` and a network object offering ``apply_to``,
``prepare_optimizer_params``, ``save_weights``… works, so ``networks.lora`` and ``lycoris.kohya`` both fit.
"""

from __future__ import annotations

import importlib
import logging
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from library.dataset.summary import DatasetSummary
from library.engine.recipe import ParamGroups, Recipe
from library.errors import UserError
from library.metadata import TrainingFacts, build_training_metadata, metadata_for_save
from library.models.components import Components
from library.models.save import save_dtype
from library.modelspec import modelspec_from_settings
from library.recipes import lycoris_compat
from library.recipes.settings import NetworkSettings

logger = logging.getLogger("sdtrain")


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """``--network_args key=value …`` as a dict of strings, split at the first ``=`` (the network parses values)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--network_args: '{item}' is not key=value; write e.g. conv_dim=4")
        out[key.strip()] = value.strip()
    return out


def import_network_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if name.split(".")[0] == "lycoris" and e.name and e.name.split(".")[0] == "lycoris":
            raise UserError(
                f"--network_module {name}: the LyCORIS package is not installed; pip install 'sd-trainer[lycoris]'"
            ) from e
        raise UserError(f"--network_module {name}: cannot import it ({e}); install it or check the name") from e


def explain_network_error(module: str, options: dict[str, str], error: AssertionError) -> UserError | None:
    """A one-line UserError for LyCORIS's duplicate-module failure (None for any other assertion).

    Built-in presets are made to target each module once (``library.recipes.lycoris_compat``); a preset file can
    still reach one module twice, through two nested target classes or through a class and a name with different
    settings, and LyCORIS then stops at its own duplicate-name assertion."""
    message = str(error)
    if not message.startswith("duplicated lora name"):
        return None
    preset = options.get("preset", "full (the default)")
    return UserError(
        f"--network_module {module}: LyCORIS failed with '{message}': preset {preset} targets that module twice "
        "(two nested target classes, or a class and a name); remove one of them from the preset, or use a "
        "built-in preset such as preset=full or preset=attn-mlp in --network_args"
    )


def network_text_encoder(components: Components) -> nn.Module | list[nn.Module]:
    """The ``text_encoder`` argument of sd-scripts' network interface: the model's one text encoder, or the list of
    them for a family with several (as sd-scripts passes SDXL's; networks then prefix ``lora_te1``, ``lora_te2``)."""
    encoders = list(components.text_encoders)
    return encoders[0] if len(encoders) == 1 else encoders


class NetworkRecipe(Recipe):
    """Train a network hooked into the UNet and/or text encoder; the base model stays frozen. ``dataset`` describes
    the training data for the saved file's ``ss_*`` metadata (None: no dataset entries)."""

    def __init__(self, settings: NetworkSettings, dataset: DatasetSummary | None = None):
        s = settings
        if s.network_train_unet_only and s.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if s.dim_from_weights and not s.network_weights:
            raise UserError("--dim_from_weights needs --network_weights (the file to take the shape from)")
        if s.network_weights and not Path(s.network_weights).is_file():
            raise UserError(f"--network_weights {s.network_weights}: no such file; give a saved network file")
        self.settings = settings
        self.dataset = dataset
        self.network_args = parse_network_args(s.network_args)
        self.module = import_network_module(s.network_module)
        self.save_dtype = save_dtype(s.save_precision)
        self.network: nn.Module | None = None
        self.components: Components | None = None
        self.metadata: dict[str, str] = {}
        self.multiplier = 1.0

    @property
    def train_unet(self) -> bool:
        return not self.settings.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.settings.network_train_unet_only

    def setup(self, components: Components, device: torch.device, weight_dtype: torch.dtype) -> None:
        s, c = self.settings, components
        self.components = c
        if s.base_weights:
            self._merge_base_weights(c, device, weight_dtype)
        if s.dim_from_weights:
            network, _ = lycoris_compat.create_network_from_weights(
                self.module, 1, s.network_weights, c.vae, network_text_encoder(c), c.unet, **self.network_args
            )
        else:
            network = self._create_network(c)
        if network is None:
            raise UserError(f"--network_module {s.network_module}: create_network returned nothing")
        if hasattr(network, "prepare_network"):
            network.prepare_network(SimpleNamespace(**s.module_flags))
        if s.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
            raise UserError(f"--scale_weight_norms: {s.network_module} has no max-norm regularisation; drop it")
        network.apply_to(network_text_encoder(c), c.unet, self.train_text_encoder, self.train_unet)
        if s.network_weights:
            info = network.load_weights(s.network_weights)
            logger.info(f"loaded network weights from {s.network_weights}: {info}")
        network.to(device)
        self.network = network

    def _create_network(self, c: Components) -> nn.Module:
        s = self.settings
        try:
            return lycoris_compat.create_network(
                self.module,
                1.0,
                s.network_dim,
                s.network_alpha,
                c.vae,
                network_text_encoder(c),
                c.unet,
                neuron_dropout=s.network_dropout,
                **self.network_args,
            )
        except AssertionError as e:
            explained = explain_network_error(s.network_module, self.network_args, e)
            if explained is None:
                raise
            raise explained from e

    def _merge_base_weights(self, c: Components, device: torch.device, dtype: torch.dtype) -> None:
        multipliers = self.settings.base_weights_multiplier or []
        # building the merged networks draws random initial weights; fork the generator so the trained network
        # starts from the same weights with or without --base_weights
        with torch.random.fork_rng(devices=[]):
            for i, path in enumerate(self.settings.base_weights):
                self._merge_one(c, path, multipliers[i] if i < len(multipliers) else 1.0, device, dtype)

    def _merge_one(self, c: Components, path: str, multiplier: float, device: torch.device, dtype: torch.dtype) -> None:
        if not Path(path).is_file():
            raise UserError(f"--base_weights {path}: no such file; give a saved network file")
        module, weights = lycoris_compat.create_network_from_weights(
            self.module, multiplier, path, c.vae, network_text_encoder(c), c.unet, for_inference=True
        )
        module.merge_to(network_text_encoder(c), c.unet, weights, dtype, device)
        logger.info(f"merged --base_weights {path} (multiplier {multiplier})")

    def trainable_modules(self) -> list[nn.Module]:
        return [self.network]

    def part_parameters(self) -> dict[str, list[nn.Parameter]]:
        """The network's text-encoder and UNet modules' trained parameters (sd-scripts' ``text_encoder_loras`` /
        ``unet_loras``, which LyCORIS's network has too)."""
        return {
            part: [p for module in getattr(self.network, name, []) for p in module.parameters() if p.requires_grad]
            for part, name in (("text_encoder", "text_encoder_loras"), ("unet", "unet_loras"))
        }

    def param_groups(self) -> ParamGroups:
        s = self.settings
        result = self.network.prepare_optimizer_params(s.text_encoder_lr, s.unet_lr, s.learning_rate)
        groups, names = result if isinstance(result, tuple) else (result, [])
        if len(names) != len(groups):
            names = self._default_group_names(len(groups))
        self._call_optional("prepare_grad_etc")
        if not groups:
            raise UserError("nothing to train: every parameter group has learning rate 0 or no parameters")
        return ParamGroups(list(groups), list(names))

    def _default_group_names(self, count: int) -> list[str]:
        parts = (["textencoder"] if self.train_text_encoder else []) + (["unet"] if self.train_unet else [])
        return parts if len(parts) == count else [f"group{i}" for i in range(count)]

    def fingerprint(self) -> dict[str, Any]:
        s = self.settings
        readable = {
            "network_module": s.network_module,
            "network_args": self.network_args,
            "trains": ("text encoder + " if self.train_text_encoder else "") + ("unet" if self.train_unet else ""),
        }
        if not s.dim_from_weights:
            readable.update(network_dim=s.network_dim, network_alpha=s.network_alpha)
        return {**readable, **super().fingerprint()}

    def begin(self, plan: Any, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """Collect the ``ss_*`` metadata now that step counts, seed and optimizer are known."""
        s, dataset = self.settings, self.dataset
        datasets = list(dataset.datasets) if dataset is not None else []
        kind = type(optimizer)
        c = self.components
        facts = TrainingFacts.from_settings(
            s.metadata,
            c.family,
            c.v_parameterization,
            session_id=random.SystemRandom().randint(0, 2**32),
            training_started_at=time.time(),
            num_train_images=dataset.num_train_images if dataset is not None else 0,
            num_reg_images=dataset.num_reg_images if dataset is not None else 0,
            num_validation_images=dataset.num_validation_images if dataset is not None else 0,
            num_batches_per_epoch=plan.batches_per_epoch,
            num_epochs=plan.num_epochs,
            max_train_steps=plan.max_train_steps,
            optimizer_name=f"{kind.__module__}.{kind.__name__}",
            network_args=self.network_args or None,
            seed=seed,
            num_processes=plan.num_processes,
        )
        use_user_config = bool(s.metadata.dataset_config)
        self.metadata = build_training_metadata(facts, datasets or None, use_user_config=use_user_config)

    def _call_optional(self, name: str) -> None:
        """Network hooks that sd-scripts calls when a network module defines them."""
        hook = getattr(self.network, name, None)
        if hook is not None:
            hook(network_text_encoder(self.components), self.components.unet)

    def on_epoch_start(self, epoch: int) -> None:
        self.network.train()
        self._call_optional("on_epoch_start")

    def on_batch(self, batch: dict[str, Any]) -> None:
        self._call_optional("on_step_start")
        multipliers = batch.get("network_multipliers")
        if multipliers is None or len(multipliers) == 0:
            return
        value = float(multipliers[0])
        if not bool((torch.as_tensor(multipliers) == value).all()):
            raise UserError("network_multiplier differs inside one batch; datasets are batched separately, so check it")
        if value != self.multiplier:
            self.network.set_multiplier(value)
            self.multiplier = value

    def after_optimizer_step(self, device: torch.device) -> dict[str, float]:
        limit = self.settings.scale_weight_norms
        if not limit:
            return {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(limit, device)
        return {
            "max_norm/keys_scaled": float(scaled),
            "max_norm/average_key_norm": float(mean_norm),
            "max_norm/max_key_norm": float(max_norm),
        }

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        s = self.settings
        c = self.components
        modelspec = modelspec_from_settings(s.metadata, c.family, c.v_parameterization)
        metadata = metadata_for_save(self.metadata, step, epoch, s.no_metadata, modelspec)
        path.parent.mkdir(parents=True, exist_ok=True)  # network modules such as LyCORIS write the file directly
        self.network.save_weights(str(path), self.save_dtype, metadata)
        logger.info(f"saved {path}")
