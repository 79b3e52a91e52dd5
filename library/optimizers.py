"""Optimizer factory with sd-scripts' names and argument handling, and the fused backward pass.

``--optimizer_type`` is matched case-insensitively against sd-scripts' names; anything else is a ``torch.optim``
class name or a dotted ``module.Class`` path. Optional packages (bitsandbytes, lion-pytorch, dadaptation,
prodigyopt, schedulefree) are imported only when their optimizer is asked for.
"""

from __future__ import annotations

import ast
import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from library.errors import UserError

logger = logging.getLogger(__name__)

# lower-case name -> (module, class). Module import errors are reported with the extra that installs them.
BUILTIN_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "adamw": ("torch.optim", "AdamW"),
    "sgdnesterov": ("torch.optim", "SGD"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "sgdnesterov8bit": ("bitsandbytes.optim", "SGD8bit"),
    "lion8bit": ("bitsandbytes.optim", "Lion8bit"),
    "pagedadamw": ("bitsandbytes.optim", "PagedAdamW"),
    "pagedadamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
    "pagedadamw32bit": ("bitsandbytes.optim", "PagedAdamW32bit"),
    "pagedlion8bit": ("bitsandbytes.optim", "PagedLion8bit"),
    "lion": ("lion_pytorch", "Lion"),
    "dadaptation": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadampreprint": ("dadaptation.experimental", "DAdaptAdamPreprint"),
    "dadaptadagrad": ("dadaptation", "DAdaptAdaGrad"),
    "dadaptadam": ("dadaptation", "DAdaptAdam"),
    "dadaptadan": ("dadaptation", "DAdaptAdan"),
    "dadaptadanip": ("dadaptation.experimental", "DAdaptAdanIP"),
    "dadaptlion": ("dadaptation", "DAdaptLion"),
    "dadaptsgd": ("dadaptation", "DAdaptSGD"),
    "prodigy": ("prodigyopt", "Prodigy"),
    "adafactor": ("transformers.optimization", "Adafactor"),
    "radamschedulefree": ("schedulefree", "RAdamScheduleFree"),
    "adamwschedulefree": ("schedulefree", "AdamWScheduleFree"),
    "sgdschedulefree": ("schedulefree", "SGDScheduleFree"),
}

# top-level module -> (pip package, sd-trainer extra)
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "lion_pytorch": ("lion-pytorch", "lion"),
    "dadaptation": ("dadaptation", "dadaptation"),
    "prodigyopt": ("prodigyopt", "prodigy"),
    "schedulefree": ("schedulefree", "schedulefree"),
}


@dataclass(frozen=True)
class OptimizerSetup:
    """A built optimizer with what the trainer records about it.

    ``name`` is ``module.Class`` and ``args_text`` the ``k=v,k=v`` arguments, as sd-scripts writes them into
    ``ss_optimizer``. ``lr_scheduler_override`` is set when the optimizer dictates the schedule (Adafactor with
    ``relative_step`` needs ``adafactor:<initial lr>``); pass it to ``make_lr_scheduler`` instead of
    ``--lr_scheduler``.
    """

    name: str
    args_text: str
    optimizer: torch.optim.Optimizer
    kwargs: dict[str, Any]
    lr_scheduler_override: str | None = None


def parse_key_values(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are Python literals (``0.9,0.999`` is a tuple), else plain strings."""
    parsed: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"{flag} {item!r} is not key=value: write e.g. {flag} weight_decay=0.01")
        try:
            parsed[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            parsed[key] = text.strip()
    return parsed


def resolve_optimizer_type(optimizer_type: str | None, use_8bit_adam: bool = False, use_lion: bool = False) -> str:
    """Apply the legacy ``--use_8bit_adam`` / ``--use_lion_optimizer`` flags; the default is AdamW."""
    chosen = (optimizer_type or "").strip()
    if use_8bit_adam and use_lion:
        raise UserError("--use_8bit_adam and --use_lion_optimizer are both set: keep one (or use --optimizer_type)")
    if (use_8bit_adam or use_lion) and chosen:
        legacy = "--use_8bit_adam" if use_8bit_adam else "--use_lion_optimizer"
        raise UserError(f"{legacy} and --optimizer_type {chosen} are both set: keep only --optimizer_type")
    if use_8bit_adam:
        return "AdamW8bit"
    if use_lion:
        return "Lion"
    return chosen or "AdamW"


def _first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, so the error the user sees stays one line."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def import_optional(module_name: str, optimizer_type: str) -> Any:
    """Import a module an optimizer needs; a missing optional package becomes a UserError naming the extra."""
    root = module_name.split(".")[0]
    try:
        importlib.import_module(root)
        return importlib.import_module(module_name)
    except ImportError as error:
        if root in OPTIONAL_PACKAGES:
            package, extra = OPTIONAL_PACKAGES[root]
            raise UserError(
                f"--optimizer_type {optimizer_type} needs the {package} package, which cannot be imported "
                f'({_first_line(error)}): pip install "sd-trainer[{extra}]"'
            ) from error
        raise UserError(
            f"--optimizer_type {optimizer_type}: module {module_name!r} cannot be imported ({_first_line(error)}): "
            "install the package that provides it or fix the name"
        ) from error


def _resolve_class(optimizer_type: str) -> type:
    key = optimizer_type.lower()
    if key in BUILTIN_OPTIMIZERS:
        module_name, class_name = BUILTIN_OPTIMIZERS[key]
    elif key.startswith("dadapt"):
        names = sorted(k for k in BUILTIN_OPTIMIZERS if k.startswith("dadapt"))
        raise UserError(f"--optimizer_type {optimizer_type} is not a D-Adaptation optimizer: use one of {names}")
    elif "." in optimizer_type:
        module_name, _, class_name = optimizer_type.rpartition(".")
    else:
        module_name, class_name = "torch.optim", optimizer_type
    module = import_optional(module_name, optimizer_type)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(
            f"--optimizer_type {optimizer_type}: {module_name} has no {class_name}; use one of sd-scripts' names "
            "(AdamW, AdamW8bit, Lion, Prodigy, AdaFactor, ...), a torch.optim class or a module.Class path"
        )
    return cls


def _has_groups(params: Any) -> bool:
    return isinstance(params, list) and len(params) > 0 and isinstance(params[0], dict)


def _warn_adaptive_lr(params: Any, lr: float) -> None:
    """D-Adaptation and Prodigy estimate the step size themselves; sd-scripts warns about small or mixed LRs."""
    actual_lr = lr
    lrs = {lr}
    if _has_groups(params):
        actual_lr = params[0].get("lr", lr)
        lrs = {group.get("lr", actual_lr) for group in params}
    if actual_lr <= 0.1:
        logger.warning("learning rate %s is low for D-Adaptation/Prodigy: about 1.0 is recommended", actual_lr)
    if len(lrs) > 1:
        logger.warning("D-Adaptation/Prodigy use only the first group's learning rate (%s)", actual_lr)


def _adafactor_relative_step(params: Any, lr: float, kwargs: dict[str, Any]) -> tuple[Any, float | None, str | None]:
    """sd-scripts' Adafactor rules: relative_step defaults to True and then the LR is only the scheduler's start."""
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: warmup_init needs relative_step, setting relative_step=True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        return params, lr, None
    if lr != 0.0:
        logger.info("AdaFactor with relative_step: the learning rate %s is used as the initial LR only", lr)
    if _has_groups(params):
        if any("lr" in group for group in params):
            logger.warning("AdaFactor with relative_step ignores per-group learning rates (unet_lr, text_encoder_lr)")
        params = [{k: v for k, v in group.items() if k != "lr"} for group in params]
    return params, None, f"adafactor:{lr}"


def _listed(params: Any) -> Any:
    """``params`` with every iterable made a list (groups are copied, never modified), so it can be read twice."""
    if isinstance(params, torch.Tensor):
        return params  # torch refuses a bare tensor with its own message
    items = list(params)
    if not (items and isinstance(items[0], dict)):
        return items
    return [{**group, "params": _as_list(group["params"])} for group in items]


def _as_list(params: Any) -> list[Any]:
    """A group's ``params`` as a list (torch accepts one tensor there)."""
    return [params] if isinstance(params, torch.Tensor) else list(params)


def adamw_kernel(params: Any) -> str:
    """``"fused"`` when torch has a fused AdamW kernel for every parameter's device and dtype, else ``"foreach"``.

    torch itself picks neither on CPU (its per-tensor loop is the slowest); the fused kernel is about twice as fast as
    ``foreach`` there. Its results differ from the other two in the last bits, as on CUDA. ``params`` is a list of
    tensors or of param-group dicts (see :func:`_listed`).
    """
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach
    except ImportError:  # a torch without it: foreach is available everywhere the trainer runs
        return "foreach"
    if isinstance(params, torch.Tensor):
        return "foreach"
    groups = params if _has_groups(params) else [{"params": params}]
    tensors = [p for group in groups for p in _as_list(group["params"])]
    if not tensors:
        return "foreach"
    fused, _ = _default_to_fused_or_foreach(tensors, differentiable=False, use_fused=True)
    return "fused" if fused else "foreach"


def make_optimizer(
    optimizer_type: str | None,
    params: Any,
    lr: float,
    optimizer_args: Iterable[str] | None = None,
    *,
    use_8bit_adam: bool = False,
    use_lion_optimizer: bool = False,
) -> OptimizerSetup:
    """Build the optimizer sd-scripts' ``get_optimizer`` would for these flags.

    ``params`` is an iterable of tensors or a list of param-group dicts (the caller's dicts are not modified).
    """
    optimizer_type = resolve_optimizer_type(optimizer_type, use_8bit_adam, use_lion_optimizer)
    kwargs = parse_key_values(optimizer_args, "--optimizer_args")
    key = optimizer_type.lower()
    cls = _resolve_class(optimizer_type)

    fixed: dict[str, Any] = {}
    lr_arg: float | None = lr
    override = None
    if key in ("sgdnesterov", "sgdnesterov8bit"):
        kwargs.setdefault("momentum", 0.9)
        fixed["nesterov"] = True
    elif key.startswith("dadapt") or key == "prodigy":
        _warn_adaptive_lr(params, lr)
    elif key == "adafactor":
        params, lr_arg, override = _adafactor_relative_step(params, lr, kwargs)
    elif key == "adamw" and not {"foreach", "fused", "differentiable"} & kwargs.keys():
        params = _listed(params)
        fixed[adamw_kernel(params)] = True

    try:
        optimizer = cls(params, lr=lr_arg, **fixed, **kwargs)
    except TypeError as error:
        raise UserError(f"--optimizer_args {kwargs} do not fit {cls.__module__}.{cls.__name__}: {error}") from error
    train_mode = getattr(optimizer, "train", None)
    if callable(train_mode):
        train_mode()
    logger.info("optimizer %s.%s | %s", cls.__module__, cls.__name__, kwargs)
    return OptimizerSetup(
        name=f"{cls.__module__}.{cls.__name__}",
        args_text=",".join(f"{k}={v}" for k, v in kwargs.items()),
        optimizer=optimizer,
        kwargs=kwargs,
        lr_scheduler_override=override,
    )


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer flags (``add_optimizer_arguments``); field names are the flags' names."""

    optimizer_type: str = ""
    learning_rate: float = 2.0e-6
    optimizer_args: list[str] | None = None
    use_8bit_adam: bool = False
    use_lion_optimizer: bool = False


def optimizer_from_settings(settings: OptimizerSettings, params: Any, lr: float | None = None) -> OptimizerSetup:
    """:func:`make_optimizer` for these settings (``lr`` overrides ``--learning_rate``)."""
    return make_optimizer(
        settings.optimizer_type,
        params,
        settings.learning_rate if lr is None else lr,
        settings.optimizer_args,
        use_8bit_adam=settings.use_8bit_adam,
        use_lion_optimizer=settings.use_lion_optimizer,
    )


def is_schedule_free(optimizer: Any) -> bool:
    """True for schedulefree's optimizers, which need ``train()``/``eval()`` and take no LR schedule."""
    return type(optimizer).__module__.split(".")[0] == "schedulefree"


def supports_fused_backward(optimizer: Any) -> bool:
    """The fused backward pass is supported for torch's AdamW and transformers' Adafactor."""
    from transformers.optimization import Adafactor

    return type(optimizer) in (torch.optim.AdamW, Adafactor)


def register_fused_backward(
    optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0, gradient_accumulation_steps: int = 1
) -> list[Any]:
    """Step each parameter as soon as its gradient is ready during ``backward()``, then free that gradient.

    Peak memory drops because gradients never all exist at once. Each hook runs the optimizer on a one-parameter
    copy of that parameter's group, so optimizer state, ``state_dict()`` and LR schedulers work unchanged. With
    ``max_grad_norm`` each gradient is clipped on its own (sd-scripts does the same). The caller must not call
    ``optimizer.step()`` itself and should call ``optimizer.zero_grad(set_to_none=True)`` before the first backward.
    Returns the hook handles (``handle.remove()`` undoes it).
    """
    if not supports_fused_backward(optimizer):
        raise UserError(
            f"--fused_backward_pass works with AdamW and AdaFactor, not {type(optimizer).__name__}: "
            "change --optimizer_type or drop --fused_backward_pass"
        )
    if gradient_accumulation_steps != 1:
        raise UserError(
            f"--fused_backward_pass cannot accumulate gradients (--gradient_accumulation_steps "
            f"{gradient_accumulation_steps}): set it to 1 or drop --fused_backward_pass"
        )

    def make_hook(group: dict[str, Any]):
        def hook(param: torch.Tensor) -> None:
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
            all_groups = optimizer.param_groups
            optimizer.param_groups = [{**group, "params": [param]}]
            try:
                optimizer.step()
            finally:
                optimizer.param_groups = all_groups
            param.grad = None

        return hook

    handles = []
    for group in optimizer.param_groups:
        hook = make_hook(group)
        for param in group["params"]:
            if param.requires_grad:
                handles.append(param.register_post_accumulate_grad_hook(hook))
    return handles
