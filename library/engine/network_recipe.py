"""The recipe of ``train_network.py``: a LoRA-family network from ``--network_module`` (sd-scripts' interface).

Any module with ``create_network`` / ``create_network_from_weights`` and a network object offering ``apply_to``,
``prepare_optimizer_params``, ``save_weights``… works, so ``networks.lora`` and ``lycoris.kohya`` both fit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from library.engine import lycoris_compat
from library.engine.recipe import ParamGroups, Recipe
from library.errors import UserError
from library.metadata import (
    DatasetMetadata,
    SubsetMetadata,
    TrainingFacts,
    bucket_info,
    build_training_metadata,
    count_tags,
    metadata_for_save,
    modelspec_from_args,
)
from library.models.components import Components
from library.models.save import save_dtype

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


def explain_network_error(module: str, network_args: dict[str, str], error: AssertionError) -> UserError | None:
    """A one-line UserError for LyCORIS's duplicate-module failure (None for any other assertion).

    Built-in presets are made to target each module once (``library.engine.lycoris_compat``); a preset file can
    still reach one module twice, through two nested target classes or through a class and a name with different
    settings, and LyCORIS then stops at its own duplicate-name assertion."""
    message = str(error)
    if not message.startswith("duplicated lora name"):
        return None
    preset = network_args.get("preset", "full (the default)")
    return UserError(
        f"--network_module {module}: LyCORIS failed with '{message}': preset {preset} targets that module twice "
        "(two nested target classes, or a class and a name); remove one of them from the preset, or use a "
        "built-in preset such as preset=full or preset=attn-mlp in --network_args"
    )


def dataset_tag_frequency(config: Any, records: list[Any]) -> dict[str, dict[str, int]]:
    """``{folder or metadata file name: {tag: count}}`` from the raw captions, as sd-scripts counts them.

    DreamBooth subsets count each image's caption file (or the class tokens when it has none); fine-tuning
    subsets count the ``tags`` of every metadata entry. Subsets with the same folder name share one dict."""
    from library.dataset.scan import read_metadata

    out: dict[str, dict[str, int]] = {}
    for s, subset in enumerate(config.subsets):
        if config.style == "dreambooth":
            name = Path(subset.image_dir).name
            captions = [
                "\n".join(r.captions) if r.captions else subset.class_tokens or ""
                for r in records
                if r.subset_index == s
            ]
        else:
            name = Path(subset.metadata_file).name
            entries = read_metadata(Path(subset.metadata_file)).values()
            captions = [str(e["tags"]) for e in entries if e.get("tags") is not None]
        out[name] = count_tags(captions, out.get(name))
    return out


def dataset_bucket_info(dataset: Any, d: int) -> dict[str, Any] | None:
    """``bucket_info`` of dataset ``d`` (None without bucketing): samples per bucket in epoch 1, repeats included."""
    config = dataset.datasets[d]
    if not config.enable_bucket:
        return None
    samples: dict[tuple[int, int], int] = {}
    for plan in dataset.batch_plan(1):
        if plan.dataset_index == d:
            samples[plan.bucket] = samples.get(plan.bucket, 0) + len(plan.items)
    errors = [
        a.bucket[0] / a.bucket[1] - r.size[0] / r.size[1] for r, a in zip(dataset.records[d], dataset.assignments[d])
    ]
    return bucket_info(samples, errors)


def dataset_metadata(dataset: Any) -> list[DatasetMetadata]:
    """``ss_datasets`` entries from a ``library.dataset.loader.TrainDataset`` (empty for other sources)."""
    out: list[DatasetMetadata] = []
    for d, (config, records) in enumerate(zip(getattr(dataset, "datasets", []), getattr(dataset, "records", []))):
        subsets = []
        for s, subset in enumerate(config.subsets):
            count = sum(1 for r in records if r.subset_index == s)
            subsets.append(
                SubsetMetadata(
                    img_count=count,
                    num_repeats=subset.num_repeats,
                    image_dir=None if subset.image_dir is None else Path(subset.image_dir).name,
                    metadata_file=None if subset.metadata_file is None else Path(subset.metadata_file).name,
                    class_tokens=subset.class_tokens,
                    is_reg=subset.is_reg,
                    color_aug=subset.color_aug,
                    flip_aug=subset.flip_aug,
                    random_crop=subset.random_crop,
                    shuffle_caption=subset.shuffle_caption,
                    keep_tokens=subset.keep_tokens,
                    keep_tokens_separator=subset.keep_tokens_separator,
                    secondary_separator=subset.secondary_separator,
                    enable_wildcard=subset.enable_wildcard,
                    caption_prefix=subset.caption_prefix,
                    caption_suffix=subset.caption_suffix,
                )
            )
        reg = sum(s.img_count * s.num_repeats for s in subsets if s.is_reg)
        train = sum(s.img_count * s.num_repeats for s in subsets if not s.is_reg)
        out.append(
            DatasetMetadata(
                is_dreambooth=config.style == "dreambooth",
                batch_size=config.batch_size,
                num_train_images=int(train),
                num_reg_images=int(reg),
                resolution=config.resolution,
                enable_bucket=config.enable_bucket,
                min_bucket_reso=config.min_bucket_reso,
                max_bucket_reso=config.max_bucket_reso,
                bucket_no_upscale=config.bucket_no_upscale,
                tag_frequency=dataset_tag_frequency(config, records),
                bucket_info=dataset_bucket_info(dataset, d),
                resize_interpolation=config.resize_interpolation,
                subsets=subsets,
            )
        )
    return out


class NetworkRecipe(Recipe):
    """Train a network hooked into the UNet and/or text encoder; the base model stays frozen."""

    def __init__(self, args: argparse.Namespace, dataset: Any = None):
        if args.network_train_unet_only and args.network_train_text_encoder_only:
            raise UserError("--network_train_unet_only and --network_train_text_encoder_only exclude each other")
        if args.dim_from_weights and not args.network_weights:
            raise UserError("--dim_from_weights needs --network_weights (the file to take the shape from)")
        if args.network_weights and not Path(args.network_weights).is_file():
            raise UserError(f"--network_weights {args.network_weights}: no such file; give a saved network file")
        self.args = args
        self.dataset = dataset
        self.network_args = parse_network_args(args.network_args)
        self.module = import_network_module(args.network_module)
        self.save_dtype = save_dtype(args.save_precision)
        self.network: nn.Module | None = None
        self.components: Components | None = None
        self.metadata: dict[str, str] = {}
        self.multiplier = 1.0

    @property
    def train_unet(self) -> bool:
        return not self.args.network_train_text_encoder_only

    @property
    def train_text_encoder(self) -> bool:
        return not self.args.network_train_unet_only

    def setup(self, components: Components, device: torch.device, weight_dtype: torch.dtype) -> None:
        args, c = self.args, components
        self.components = c
        if args.base_weights:
            self._merge_base_weights(c, device, weight_dtype)
        if args.dim_from_weights:
            network, _ = lycoris_compat.create_network_from_weights(
                self.module, 1, args.network_weights, c.vae, c.text_encoder, c.unet, **self.network_args
            )
        else:
            network = self._create_network(c)
        if network is None:
            raise UserError(f"--network_module {args.network_module}: create_network returned nothing")
        if hasattr(network, "prepare_network"):
            network.prepare_network(args)
        if args.scale_weight_norms and not hasattr(network, "apply_max_norm_regularization"):
            raise UserError(f"--scale_weight_norms: {args.network_module} has no max-norm regularisation; drop it")
        network.apply_to(c.text_encoder, c.unet, self.train_text_encoder, self.train_unet)
        if args.network_weights:
            info = network.load_weights(args.network_weights)
            logger.info(f"loaded network weights from {args.network_weights}: {info}")
        network.to(device)
        self.network = network

    def _create_network(self, c: Components) -> nn.Module:
        args = self.args
        try:
            return lycoris_compat.create_network(
                self.module,
                1.0,
                args.network_dim,
                args.network_alpha,
                c.vae,
                c.text_encoder,
                c.unet,
                neuron_dropout=args.network_dropout,
                **self.network_args,
            )
        except AssertionError as e:
            explained = explain_network_error(args.network_module, self.network_args, e)
            if explained is None:
                raise
            raise explained from e

    def _merge_base_weights(self, c: Components, device: torch.device, dtype: torch.dtype) -> None:
        multipliers = self.args.base_weights_multiplier or []
        # building the merged networks draws random initial weights; fork the generator so the trained network
        # starts from the same weights with or without --base_weights
        with torch.random.fork_rng(devices=[]):
            for i, path in enumerate(self.args.base_weights):
                self._merge_one(c, path, multipliers[i] if i < len(multipliers) else 1.0, device, dtype)

    def _merge_one(self, c: Components, path: str, multiplier: float, device: torch.device, dtype: torch.dtype) -> None:
        if not Path(path).is_file():
            raise UserError(f"--base_weights {path}: no such file; give a saved network file")
        module, weights = lycoris_compat.create_network_from_weights(
            self.module, multiplier, path, c.vae, c.text_encoder, c.unet, for_inference=True
        )
        module.merge_to(c.text_encoder, c.unet, weights, dtype, device)
        logger.info(f"merged --base_weights {path} (multiplier {multiplier})")

    def trainable_modules(self) -> list[nn.Module]:
        return [self.network]

    def param_groups(self) -> ParamGroups:
        args = self.args
        result = self.network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
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
        args = self.args
        readable = {
            "network_module": args.network_module,
            "network_args": self.network_args,
            "trains": ("text encoder + " if self.train_text_encoder else "") + ("unet" if self.train_unet else ""),
        }
        if not args.dim_from_weights:
            readable.update(network_dim=args.network_dim, network_alpha=args.network_alpha)
        return {**readable, **super().fingerprint()}

    def begin(self, plan: Any, seed: int, optimizer: torch.optim.Optimizer) -> None:
        """Collect the ``ss_*`` metadata now that step counts, seed and optimizer are known."""
        args = self.args
        datasets = dataset_metadata(self.dataset)
        kind = type(optimizer)
        facts = TrainingFacts.from_args(
            args,
            session_id=random.SystemRandom().randint(0, 2**32),
            training_started_at=time.time(),
            num_train_images=sum(d.num_train_images for d in datasets),
            num_reg_images=sum(d.num_reg_images for d in datasets),
            num_batches_per_epoch=plan.batches_per_epoch,
            num_epochs=plan.num_epochs,
            max_train_steps=plan.max_train_steps,
            optimizer_name=f"{kind.__module__}.{kind.__name__}",
            optimizer_args=",".join(getattr(args, "optimizer_args", None) or []),
            network_args=self.network_args or None,
            seed=seed,
            num_processes=plan.num_processes,
            v2=self.components.v2,
            v_parameterization=self.components.v_parameterization,
        )
        self.metadata = build_training_metadata(facts, datasets or None, use_user_config=bool(args.dataset_config))

    def _call_optional(self, name: str) -> None:
        """Network hooks that sd-scripts calls when a network module defines them."""
        hook = getattr(self.network, name, None)
        if hook is not None:
            hook(self.components.text_encoder, self.components.unet)

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
        if not self.args.scale_weight_norms:
            return {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(self.args.scale_weight_norms, device)
        return {
            "max_norm/keys_scaled": float(scaled),
            "max_norm/average_key_norm": float(mean_norm),
            "max_norm/max_key_norm": float(max_norm),
        }

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        args = self.args
        metadata = metadata_for_save(self.metadata, step, epoch, args.no_metadata, modelspec_from_args(args))
        path.parent.mkdir(parents=True, exist_ok=True)  # network modules such as LyCORIS write the file directly
        self.network.save_weights(str(path), self.save_dtype, metadata)
        logger.info(f"saved {path}")
