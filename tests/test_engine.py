"""The shared training loop on the real tiny model with an in-test batch source and recipe.

The recipe trains two UNet tensors in full so these tests do not depend on the LoRA module; the parts are written
out here so a hand-written training step can serve as the reference.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest
import tomllib
import torch
import torch.nn.functional as F

import library.engine.loop as loop_module
from library.engine import EngineConfig, LossInputs, ParamGroups, Recipe, TrainingDiverged, TrainingParts, train
from library.engine.wiring import optimizer_factory
from library.errors import UserError
from library.io import save_safetensors
from library.models.family import Conditioning
from library.models.tiny import make_tiny_model
from library.optimizers import BUILTIN_OPTIMIZERS, OPTIONAL_PACKAGES, OptimizerSettings
from library.schedulers import LRSchedulerSettings
from library.seeds import step_generator

TRAINED = ("conv_out.weight", "conv_out.bias")


class RandomLatents:
    """``n`` random latents with captions; each epoch visits them in a seeded order, ``batch_size`` at a time."""

    def __init__(self, n: int = 4, batch_size: int = 2, nan_items: tuple[int, ...] = ()):
        gen = torch.Generator().manual_seed(123)
        self.latents = torch.randn(n, 4, 8, 8, generator=gen) * 5
        for i in nan_items:
            self.latents[i] = float("nan")
        self.captions = [f"a photo of thing {i}" for i in range(n)]
        self.batch_size = batch_size

    def batch_plan(self, epoch: int) -> list[tuple[int, ...]]:
        order = torch.randperm(len(self.captions), generator=torch.Generator().manual_seed(epoch)).tolist()
        return [tuple(order[k : k + self.batch_size]) for k in range(0, len(order), self.batch_size)]

    def load_batch(self, plan: tuple[int, ...]) -> dict:
        return {
            "latents": self.latents[list(plan)],
            "images": None,
            "captions": [self.captions[i] for i in plan],
            "loss_weights": torch.tensor([1.0 if i % 2 == 0 else 0.5 for i in plan]),
            "alpha_masks": None,
            "network_multipliers": torch.ones(len(plan)),
        }


class UNetTensorsRecipe(Recipe):
    """Trains ``conv_out`` of the UNet in full (a stand-in for a network in engine tests)."""

    def __init__(self):
        self.unet = None

    @property
    def train_unet(self) -> bool:
        return True

    @property
    def train_text_encoder(self) -> bool:
        return False

    def setup(self, components, device, weight_dtype):
        self.unet = components.unet
        self.unet.conv_out.to(torch.float32).requires_grad_(True)

    def trainable_modules(self):
        return [self.unet.conv_out]

    def param_groups(self):
        return ParamGroups([{"params": list(self.unet.conv_out.parameters())}], ["unet"])

    def save(self, path: Path, *, epoch: int, step: int, final: bool) -> None:
        save_safetensors({k: v for k, v in self.unet.state_dict().items() if k in TRAINED}, path)


def text_states(text_encoder, tokenizer, captions):
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device)).last_hidden_state


def encode_text(text_encoders, tokenizers, captions, batch=None) -> Conditioning:
    (text_encoder,), (tokenizer,) = text_encoders, tokenizers
    return Conditioning(text_states(text_encoder, tokenizer, captions))


def make_parts(scheduler, lr: float = 0.05, momentum: float = 0.0, sample=None) -> TrainingParts:
    def add_noise(latents, generator):
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
        return scheduler.add_noise(latents, noise, timesteps), noise, timesteps, noise

    def loss(inputs: LossInputs):
        return F.mse_loss(inputs.model_pred, inputs.target, reduction="none").mean(dim=(1, 2, 3))

    def make_optimizer(groups, total_steps):
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / (2 * total_steps))

    return TrainingParts(
        encode_text=encode_text, add_noise=add_noise, loss=loss, make_optimizer=make_optimizer, sample=sample
    )


def run(tmp_path: Path, source=None, parts_kwargs=None, **config) -> tuple:
    components = make_tiny_model()
    settings = dict(output_dir=tmp_path / "out", output_name="x", max_train_steps=2, seed=7)
    settings.update(config)
    result = train(
        EngineConfig(**settings),
        components,
        source or RandomLatents(),
        UNetTensorsRecipe(),
        make_parts(components.scheduler, **(parts_kwargs or {})),
    )
    return result, components


def trained(components) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in components.unet.state_dict().items() if k in TRAINED}


def reference_training(steps: int, accumulation: int, batch_size: int, n: int = 4, lr: float = 0.05, seed: int = 7):
    """A hand-written loop doing what the engine should: same data order, generators, weights and clipping."""
    c = make_tiny_model()
    source = RandomLatents(n=n, batch_size=batch_size)
    c.unet.requires_grad_(False)
    c.text_encoder.requires_grad_(False)
    params = list(c.unet.conv_out.parameters())
    for p in params:
        p.requires_grad_(True)
    parts = make_parts(c.scheduler, lr=lr)
    total_steps = steps
    done, epoch = 0, 0
    while done < steps:
        plans = source.batch_plan(epoch + 1)
        for group_start in range(0, len(plans), accumulation):
            group = list(range(group_start, min(group_start + accumulation, len(plans))))
            for index in group:
                batch = source.load_batch(plans[index])
                gen = step_generator(seed, "batch", epoch, index)
                latents = batch["latents"] * 0.18215
                cond = text_states(c.text_encoder, c.tokenizer, batch["captions"])
                noisy, noise, t, target = parts.add_noise(latents, gen)
                pred = c.unet(noisy, t, cond).sample
                per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * batch["loss_weights"]
                (per_sample.mean() / len(group)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            with torch.no_grad():
                for p in params:
                    p -= lr * (1.0 - done / (2 * total_steps)) * p.grad
                    p.grad = None
            done += 1
            if done == steps:
                break
        epoch += 1
    return trained(c)


@pytest.mark.parametrize("accumulation, batch_size, n, steps", [(1, 2, 4, 3), (2, 1, 3, 4)])
def test_training_matches_a_hand_written_loop(tmp_path, accumulation, batch_size, n, steps):
    """With 3 batches and accumulation 2 each epoch ends with a group of one batch (its loss is not halved)."""
    result, components = run(
        tmp_path,
        source=RandomLatents(n=n, batch_size=batch_size),
        max_train_steps=steps,
        gradient_accumulation_steps=accumulation,
    )
    assert result.global_step == steps
    expected = reference_training(steps, accumulation, batch_size, n)
    got = trained(components)
    for key in TRAINED:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)
    assert not torch.equal(got["conv_out.weight"], make_tiny_model().unet.conv_out.weight)


def test_epochs_win_and_outputs_follow_sd_scripts_names_and_cleanup(tmp_path):
    result, _ = run(
        tmp_path,
        max_train_steps=100,
        max_train_epochs=3,
        save_every_n_epochs=1,
        save_last_n_epochs=1,
        save_every_n_steps=2,
        save_last_n_steps=2,
        save_state=True,
    )
    assert (result.global_step, result.epochs) == (6, 3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "x-000002-state",
        "x-000002.safetensors",
        "x-state",
        "x-step00000004-state",
        "x-step00000004.safetensors",
        "x-step00000006-state",
        "x-step00000006.safetensors",
        "x.safetensors",
        "x_report.txt",
    ]
    state = json.loads((out / "x-step00000004-state" / "train_state.json").read_text())
    assert state["position"] == {"global_step": 4, "epoch": 1, "batches_done": 2}
    assert (state["current_step"], state["current_epoch"], state["seed"]) == (4, 2, 7)
    assert (out / "x-step00000004-state" / "model.safetensors").is_file()


def test_default_names_without_output_name(tmp_path):
    run(tmp_path, output_name=None, max_train_steps=4, save_every_n_epochs=1, save_every_n_steps=3)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["at-step00000003.safetensors", "epoch-000001.safetensors", "last.safetensors", "last_report.txt"]


def test_nan_loss_stops_before_saving_and_names_the_step(tmp_path):
    source = RandomLatents(n=4, batch_size=1, nan_items=(2,))
    order = [p[0] for p in source.batch_plan(1)]
    bad_step = order.index(2) + 1
    with pytest.raises(TrainingDiverged) as info:
        run(tmp_path, source=source, max_train_steps=4, save_every_n_steps=1)
    message = str(info.value)
    assert f"at step {bad_step} (epoch 1, batch {bad_step})" in message
    assert "the latents themselves are NaN/inf" in message and "--nan_policy skip" in message
    saved = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert saved == [f"x-step{s:08d}.safetensors" for s in range(1, bad_step)]


def test_nan_policy_skip_skips_the_step_and_finishes(tmp_path):
    source = RandomLatents(n=4, batch_size=1, nan_items=(2,))
    result, components = run(tmp_path, source=source, max_train_steps=4, nan_policy="skip")
    assert (result.global_step, result.skipped_steps) == (4, 1)
    assert all(torch.isfinite(v).all() for v in trained(components).values())
    assert (tmp_path / "out" / "x.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    _, plain = run(tmp_path / "a", max_train_steps=2)
    _, checkpointed = run(tmp_path / "b", max_train_steps=2, gradient_checkpointing=True)
    for key in TRAINED:
        torch.testing.assert_close(trained(checkpointed)[key], trained(plain)[key], rtol=0, atol=1e-6)


def test_two_runs_with_different_precision_in_one_process(tmp_path):
    result, bf16 = run(tmp_path / "a", max_train_steps=2, mixed_precision="bf16")
    assert result.global_step == 2
    assert all(torch.isfinite(v).all() for v in trained(bf16).values())
    _, fp32 = run(tmp_path / "b", max_train_steps=3)
    expected = reference_training(3, 1, 2)
    torch.testing.assert_close(trained(fp32)["conv_out.weight"], expected["conv_out.weight"], rtol=0, atol=1e-6)


def test_sampling_cadence_and_sampling_does_not_disturb_training(tmp_path):
    calls = []

    def sample(request):
        calls.append((request.step, request.epoch))
        torch.rand(1000)

    _, with_samples = run(
        tmp_path / "a",
        parts_kwargs={"sample": sample},
        max_train_steps=4,
        sample_every_n_steps=3,
        sample_at_first=True,
    )
    assert calls == [(0, 0), (3, None)]
    _, without = run(tmp_path / "b", max_train_steps=4)
    assert torch.equal(trained(with_samples)["conv_out.weight"], trained(without)["conv_out.weight"])
    calls.clear()
    run(tmp_path / "c", parts_kwargs={"sample": sample}, max_train_steps=4, sample_every_n_epochs=1)
    assert calls == [(2, 1), (4, 2)]


def test_tensorboard_event_file_has_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, max_train_steps=4, logging_dir=tmp_path / "logs", log_prefix="run_")
    runs = list((tmp_path / "logs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("run_")
    events = list(runs[0].rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "loss/epoch", "lr/unet"} <= tags
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3, 4]
    lrs = [e.value for e in acc.Scalars("lr/unet")]
    assert lrs == pytest.approx([0.05 * (1 - s / 8) for s in range(1, 5)])


class StepRecordingRecipe(UNetTensorsRecipe):
    """Records the order of ``on_step_start`` (with its global step) and ``on_batch`` calls."""

    def __init__(self):
        super().__init__()
        self.events: list = []

    def on_step_start(self, global_step: int) -> None:
        self.events.append(global_step)

    def on_batch(self, batch) -> None:
        self.events.append("batch")


def run_recording(tmp_path: Path, source, **config) -> tuple:
    components = make_tiny_model()
    recipe = StepRecordingRecipe()
    settings = dict(output_dir=tmp_path / "out", output_name="x", seed=7, **config)
    result = train(EngineConfig(**settings), components, source, recipe, make_parts(components.scheduler))
    return result, recipe.events


def test_on_step_start_gets_each_global_step_before_its_batches_and_counts_skipped_steps(tmp_path):
    order = [p[0] for p in RandomLatents(n=4, batch_size=1).batch_plan(1)]
    source = RandomLatents(n=4, batch_size=1, nan_items=(order[1],))
    result, events = run_recording(
        tmp_path, source, max_train_steps=4, gradient_accumulation_steps=2, nan_policy="skip"
    )
    assert (result.global_step, result.skipped_steps) == (4, 2)  # the NaN item is in one step of each epoch
    assert events == [0, "batch", "batch", 1, "batch", "batch", 2, "batch", "batch", 3, "batch", "batch"]


def test_on_step_start_counts_from_the_resume_and_initial_step_position(tmp_path):
    source = RandomLatents(n=4, batch_size=1)
    _, events = run_recording(tmp_path / "a", source, max_train_steps=4, save_every_n_steps=2, save_state=True)
    assert events == [0, "batch", 1, "batch", 2, "batch", 3, "batch"]
    state = tmp_path / "a" / "out" / "x-step00000002-state"
    _, resumed = run_recording(tmp_path / "b", source, max_train_steps=4, resume=state)
    assert resumed == [2, "batch", 3, "batch"]
    _, skipped_ahead = run_recording(
        tmp_path / "c", source, max_train_steps=4, initial_step=3, skip_until_initial_step=True
    )
    assert skipped_ahead == [3, "batch"]


def test_full_recipe_stops_the_text_encoder_at_global_step_n_when_a_nan_step_was_skipped(tmp_path):
    """--stop_text_encoder_training 3 with step 1 skipped (NaN): the text encoder moves in steps 2 and 3 only."""

    from library.recipes.full import FullRecipe
    from library.recipes.settings import FullModelSettings

    order = [p[0] for p in RandomLatents(n=4, batch_size=1).batch_plan(1)]
    source = RandomLatents(n=4, batch_size=1, nan_items=(order[0],))
    snapshots: dict[int, dict[str, dict[str, torch.Tensor]]] = {}

    def snapshot(request):
        c = request.components
        snapshots[request.step] = {
            name: {k: v.detach().clone() for k, v in getattr(c, name).state_dict().items()}
            for name in ("unet", "text_encoder")
        }

    components = make_tiny_model()
    config = EngineConfig(
        output_dir=tmp_path / "out",
        output_name="x",
        seed=7,
        max_train_steps=4,
        nan_policy="skip",
        sample_at_first=True,
        sample_every_n_steps=1,
        save_model_as="safetensors",
    )
    recipe = FullRecipe(FullModelSettings(), config, text_encoder_steps=3)
    result = train(config, components, source, recipe, make_parts(components.scheduler, sample=snapshot))
    assert (result.global_step, result.skipped_steps) == (4, 1)
    assert sorted(snapshots) == [0, 1, 2, 3, 4]

    def moved(part: str, step: int) -> bool:
        before, after = snapshots[step - 1][part], snapshots[step][part]
        return any(not torch.equal(before[k], after[k]) for k in before)

    assert [moved("text_encoder", s) for s in (1, 2, 3, 4)] == [False, True, True, False]
    assert [moved("unet", s) for s in (1, 2, 3, 4)] == [False, True, True, True]


# --- loop hygiene: fused-backward hooks, zero_grad, progress bar ---------------------------------------------------


class HookRecordingRecipe(UNetTensorsRecipe):
    """Records, at each step start, how many post-accumulate-grad hooks the trained parameters carry."""

    def __init__(self):
        super().__init__()
        self.hooks_seen: list[int] = []

    def on_step_start(self, global_step: int) -> None:
        self.hooks_seen.append(post_accumulate_hooks(self.unet.conv_out))


def post_accumulate_hooks(module: torch.nn.Module) -> int:
    return sum(len(p._post_accumulate_grad_hooks or {}) for p in module.parameters())


def adamw_parts(scheduler) -> TrainingParts:
    parts = make_parts(scheduler)

    def make_optimizer(groups, total_steps):
        optimizer = torch.optim.AdamW(groups, lr=0.01)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    return TrainingParts(parts.encode_text, parts.add_noise, parts.loss, make_optimizer, None)


@pytest.mark.parametrize("fails", [False, True])
def test_fused_backward_hooks_are_removed_when_training_ends_or_fails(tmp_path, fails):
    components, recipe = make_tiny_model(), HookRecordingRecipe()
    source = RandomLatents(n=4, batch_size=1, nan_items=(0, 1, 2, 3) if fails else ())
    config = EngineConfig(output_dir=tmp_path, output_name="x", max_train_steps=2, seed=7, fused_backward_pass=True)
    if fails:
        with pytest.raises(TrainingDiverged):
            train(config, components, source, recipe, adamw_parts(components.scheduler))
    else:
        train(config, components, source, recipe, adamw_parts(components.scheduler))
    assert recipe.hooks_seen and all(n == 2 for n in recipe.hooks_seen)  # one per trained tensor while training
    assert post_accumulate_hooks(components.unet.conv_out) == 0


def test_zero_grad_inspects_the_optimizer_once_per_run_not_per_step(tmp_path, monkeypatch):
    """accelerate's zero_grad calls inspect.signature on the optimizer's zero_grad at every step; the loop does not
    (the weights are pinned against a hand-written loop, with gradient accumulation, above)."""
    inspected: list[str] = []
    signature = inspect.signature

    def counting_signature(obj, *args, **kwargs):
        inspected.append(getattr(obj, "__name__", ""))
        return signature(obj, *args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting_signature)
    result, _ = run(tmp_path, max_train_steps=4, gradient_accumulation_steps=2)
    assert result.global_step == 4
    assert inspected.count("zero_grad") == 1


def test_progress_bar_shows_the_final_average_without_redrawing_every_step(tmp_path, monkeypatch, capsys):
    averages: list[float] = []

    class Recorder(loop_module.LossRecorder):
        def add(self, loss: float) -> None:
            super().add(loss)
            averages.append(self.average)

    class SlowBar(loop_module.tqdm):
        """A bar whose timed redraws never come, so only the loop's own refreshes draw it."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, mininterval=3600, **kwargs)

    monkeypatch.setattr(loop_module, "LossRecorder", Recorder)
    monkeypatch.setattr(loop_module, "tqdm", SlowBar)
    run(tmp_path, max_train_steps=6)
    draws = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("steps")]
    assert len(averages) == 6
    assert "6/6" in draws[-1] and f"avr_loss={averages[-1]:.4f}" in draws[-1]
    assert len(draws) <= 3  # the first draw, the last step's refresh and the close


# --- the optimizer the flags build ---------------------------------------------------------------------------------


def build_optimizer(params, optimizer_type: str = "AdamW", optimizer_args: list[str] | None = None):
    settings = OptimizerSettings(optimizer_type=optimizer_type, optimizer_args=optimizer_args, learning_rate=0.1)
    return optimizer_factory(settings, LRSchedulerSettings())(params, 10)[0]


def test_adamw_uses_torch_fused_kernel_where_it_exists_and_foreach_elsewhere():
    cpu = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))]
    defaults = build_optimizer(iter(cpu)).defaults  # an iterator of tensors is read once, as torch reads it
    assert (defaults["fused"], defaults["foreach"]) == (True, None)
    groups = [{"params": iter(cpu), "lr": 0.5}]
    optimizer = build_optimizer(groups)
    assert optimizer.defaults["fused"] and optimizer.param_groups[0]["params"] == cpu and groups[0]["lr"] == 0.5
    meta = build_optimizer([torch.nn.Parameter(torch.ones(3, device="meta"))]).defaults
    assert (meta["fused"], meta["foreach"]) == (None, True)
    for given in ("foreach=False", "fused=False", "differentiable=True"):
        chosen = build_optimizer(cpu, optimizer_args=[given]).defaults
        assert chosen["fused"] in (None, False) and chosen["foreach"] in (None, False)


def test_fused_adamw_trains_like_torch_default_adamw_to_rounding():
    torch.manual_seed(0)
    start = torch.randn(64, 8)
    ours, plain = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    optimizers = build_optimizer([ours]), torch.optim.AdamW([plain], lr=0.1)
    for step in range(20):
        grad = torch.randn(64, 8, generator=torch.Generator().manual_seed(step))
        for param, optimizer in zip((ours, plain), optimizers):
            param.grad = grad.clone()
            optimizer.step()
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-6)


OPTIONAL_OPTIMIZERS = sorted(
    name for name, (module, _) in BUILTIN_OPTIMIZERS.items() if module.split(".")[0] in OPTIONAL_PACKAGES
)


@pytest.mark.parametrize("name", OPTIONAL_OPTIMIZERS)
def test_missing_optional_package_is_a_one_line_error_naming_the_pip_extra(monkeypatch, name):
    root = BUILTIN_OPTIMIZERS[name][0].split(".")[0]
    extra = OPTIONAL_PACKAGES[root][1]
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    assert extra in project["optional-dependencies"]
    monkeypatch.setitem(sys.modules, root, None)  # "import root" now fails as if the package were not installed
    with pytest.raises(UserError) as info:
        build_optimizer([torch.nn.Parameter(torch.ones(2))], optimizer_type=name)
    message = str(info.value)
    assert "\n" not in message and message.endswith(f'pip install "sd-trainer[{extra}]"')
    assert message.startswith(f"--optimizer_type {name} needs the {OPTIONAL_PACKAGES[root][0]} package")
