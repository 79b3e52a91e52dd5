"""Every optimizer name is built and stepped on a real parameter; argument parsing; the fused backward pass."""

from __future__ import annotations

import sys

import pytest
import torch

from library.errors import UserError
from library.optimizers import (
    OPTIONAL_PACKAGES,
    is_schedule_free,
    make_optimizer,
    parse_key_values,
    register_fused_backward,
    resolve_optimizer_type,
)

# name as typed (case varies on purpose) -> class sd-scripts records as ss_optimizer
EVERY_NAME = {
    "AdamW": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW": "bitsandbytes.optim.adamw.PagedAdamW",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "PagedAdamW32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "PagedLion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "SGDNesterov": "torch.optim.sgd.SGD",
    "SGDNesterov8bit": "bitsandbytes.optim.sgd.SGD8bit",
    "DAdaptation": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    "DAdaptAdam": "dadaptation.dadapt_adam.DAdaptAdam",
    "DAdaptAdaGrad": "dadaptation.dadapt_adagrad.DAdaptAdaGrad",
    "DAdaptAdan": "dadaptation.dadapt_adan.DAdaptAdan",
    "DAdaptAdanIP": "dadaptation.experimental.dadapt_adan_ip.DAdaptAdanIP",
    "DAdaptLion": "dadaptation.dadapt_lion.DAdaptLion",
    "DAdaptSGD": "dadaptation.dadapt_sgd.DAdaptSGD",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "AdaFactor": "transformers.optimization.Adafactor",
    "RAdamScheduleFree": "schedulefree.radam_schedulefree.RAdamScheduleFree",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "SGDScheduleFree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
    "RMSprop": "torch.optim.rmsprop.RMSprop",
    "torch.optim.Adagrad": "torch.optim.adagrad.Adagrad",
}


def one_step(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> None:
    optimizer.zero_grad()
    (param * torch.tensor([2.0, -1.0, 0.5, 3.0])).sum().backward()
    optimizer.step()


@pytest.mark.parametrize("name", sorted(EVERY_NAME))
def test_every_name_builds_and_steps(name):
    param = torch.nn.Parameter(torch.ones(4))
    setup = make_optimizer(name, [param], 0.1 if "DAdapt" not in name and name != "Prodigy" else 1.0)
    assert setup.name == EVERY_NAME[name]
    # RAdam's variance rectification makes its first steps pure no-ops (schedulefree's "silent SGD phase")
    for _ in range(6 if name == "RAdamScheduleFree" else 1):
        one_step(setup.optimizer, param)
    assert torch.isfinite(param).all()
    assert not torch.equal(param.detach(), torch.ones(4)), f"{name} did not move the parameter"


def test_adamw_step_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    setup = make_optimizer("adamw", [param], 0.1, ["weight_decay=0.01"])
    param.grad = torch.tensor([2.0])
    setup.optimizer.step()
    # decoupled decay 1 * (1 - 0.1 * 0.01), then the first Adam step is lr * g / (|g| + eps)
    assert param.item() == pytest.approx(0.999 - 0.1 * 2 / (2 + 1e-8), abs=1e-7)
    assert setup.args_text == "weight_decay=0.01"


def test_sgd_nesterov_defaults_momentum_and_steps_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    setup = make_optimizer("SGDNesterov", [param], 0.1)
    assert setup.kwargs == {"momentum": 0.9} and setup.args_text == "momentum=0.9"
    assert setup.optimizer.param_groups[0]["nesterov"] is True
    param.grad = torch.tensor([2.0])
    setup.optimizer.step()
    assert param.item() == pytest.approx(1 - 0.1 * (2 + 0.9 * 2))  # buf = g; update g + momentum * buf


def test_lion_step_is_sign_of_gradient():
    param = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    setup = make_optimizer("lion", [param], 0.1)
    param.grad = torch.tensor([3.0, -0.5])
    setup.optimizer.step()
    assert param.tolist() == pytest.approx([0.9, 1.1])


def test_legacy_flags():
    assert resolve_optimizer_type(None) == "AdamW"
    assert resolve_optimizer_type("", use_8bit_adam=True) == "AdamW8bit"
    assert resolve_optimizer_type("", use_lion=True) == "Lion"
    with pytest.raises(UserError, match="--use_8bit_adam and --optimizer_type"):
        resolve_optimizer_type("Lion", use_8bit_adam=True)
    with pytest.raises(UserError, match="both set"):
        resolve_optimizer_type("", use_8bit_adam=True, use_lion=True)
    param = torch.nn.Parameter(torch.ones(4))
    assert make_optimizer("", [param], 0.1, use_lion_optimizer=True).name == "lion_pytorch.lion_pytorch.Lion"


def test_parse_key_values():
    parsed = parse_key_values(
        ["weight_decay=0.01", "betas=0.9,0.999", "decouple=True", "d_coef=2", "mode=fast", "expr=a=b", " eps = 1e-8 "],
        "--optimizer_args",
    )
    assert parsed == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.999),
        "decouple": True,
        "d_coef": 2,
        "mode": "fast",
        "expr": "a=b",
        "eps": 1e-8,
    }
    assert parse_key_values(None, "--optimizer_args") == {}
    with pytest.raises(UserError, match="--optimizer_args 'weight_decay' is not key=value"):
        parse_key_values(["weight_decay"], "--optimizer_args")


def test_adafactor_relative_step_forces_its_scheduler_without_touching_caller_groups():
    param = torch.nn.Parameter(torch.ones(4))
    groups = [{"params": [param], "lr": 1e-3}]
    setup = make_optimizer("Adafactor", groups, 1e-3)
    assert groups[0]["lr"] == 1e-3
    assert setup.lr_scheduler_override == "adafactor:0.001"
    assert setup.args_text == "relative_step=True"
    assert setup.optimizer.param_groups[0]["lr"] is None
    fixed = make_optimizer("adafactor", [param], 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert fixed.lr_scheduler_override is None and fixed.optimizer.param_groups[0]["lr"] == 1e-3
    warm = make_optimizer("adafactor", [param], 1e-3, ["relative_step=False", "warmup_init=True"])
    assert warm.kwargs["relative_step"] is True and warm.lr_scheduler_override == "adafactor:0.001"


def test_schedule_free_starts_in_train_mode():
    param = torch.nn.Parameter(torch.ones(4))
    setup = make_optimizer("AdamWScheduleFree", [param], 0.1)
    assert is_schedule_free(setup.optimizer)
    assert setup.optimizer.param_groups[0]["train_mode"] is True
    assert not is_schedule_free(make_optimizer("AdamW", [param], 0.1).optimizer)


@pytest.mark.parametrize(
    "name, root",
    [
        ("AdamW8bit", "bitsandbytes"),
        ("PagedAdamW", "bitsandbytes"),
        ("Lion", "lion_pytorch"),
        ("DAdaptation", "dadaptation"),
        ("DAdaptAdam", "dadaptation"),
        ("Prodigy", "prodigyopt"),
        ("SGDScheduleFree", "schedulefree"),
    ],
)
def test_missing_optional_package_names_the_extra(monkeypatch, name, root):
    monkeypatch.setitem(sys.modules, root, None)  # makes "import root" fail as if it were not installed
    extra = OPTIONAL_PACKAGES[root][1]
    with pytest.raises(UserError, match=rf"--optimizer_type {name} needs .*pip install \"?sd-trainer\[{extra}\]\"?"):
        make_optimizer(name, [torch.nn.Parameter(torch.ones(2))], 0.1)


def test_unknown_names_and_bad_arguments():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(UserError, match="torch.optim has no NoSuchOptimizer"):
        make_optimizer("NoSuchOptimizer", [param], 0.1)
    with pytest.raises(UserError, match="module 'no_such_module' cannot be imported"):
        make_optimizer("no_such_module.Opt", [param], 0.1)
    with pytest.raises(UserError, match="DAdaptFoo is not a D-Adaptation optimizer"):
        make_optimizer("DAdaptFoo", [param], 1.0)
    with pytest.raises(UserError, match="--optimizer_args .* do not fit torch.optim.adamw.AdamW"):
        make_optimizer("AdamW", [param], 0.1, ["no_such_arg=1"])


def _twin_models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    first = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    second = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize(
    "name, args",
    [("AdamW", ["weight_decay=0.01"]), ("AdaFactor", []), ("AdaFactor", ["relative_step=False"])],
)
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_fused_backward_matches_normal_steps(name, args, max_grad_norm):
    normal_model, fused_model = _twin_models()
    normal = make_optimizer(name, list(normal_model.parameters()), 1e-2, args).optimizer
    fused = make_optimizer(name, list(fused_model.parameters()), 1e-2, args).optimizer
    handles = register_fused_backward(fused, max_grad_norm=max_grad_norm)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        normal.zero_grad(set_to_none=True)
        normal_model(x).square().sum().backward()
        if max_grad_norm:
            for p in normal_model.parameters():  # fused clipping is per parameter
                torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        normal.step()
        fused.zero_grad(set_to_none=True)
        fused_model(x).square().sum().backward()
        assert all(p.grad is None for p in fused_model.parameters())
        for group in (*normal.param_groups, *fused.param_groups):
            if group["lr"] is not None:
                group["lr"] *= 0.5  # what an LR scheduler does between steps
    for a, b in zip(normal_model.parameters(), fused_model.parameters()):
        assert torch.equal(a, b)
    assert len(fused.state_dict()["state"]) == 4
    for handle in handles:
        handle.remove()


def test_fused_backward_refuses_other_optimizers_and_accumulation():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(UserError, match="--fused_backward_pass works with AdamW and AdaFactor"):
        register_fused_backward(make_optimizer("Lion", [param], 0.1).optimizer)
    with pytest.raises(UserError, match="--gradient_accumulation_steps 2"):
        register_fused_backward(make_optimizer("AdamW", [param], 0.1).optimizer, gradient_accumulation_steps=2)
