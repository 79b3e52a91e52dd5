"""Engine options: attention choice, schedule-free eval weights, fused backward pass, data-loader workers,
--debug_dataset, and where the VAE lives."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import schedulefree
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

import train_network
from library.cli import run_cli
from library.engine import EngineConfig, TrainingParts, train
from library.engine.attention import AttentionSettings, apply_attention, attention_from_settings, choose_attention
from library.engine.data import EpochLoader, loader_workers
from library.io import load_safetensors
from library.models.tiny import make_tiny_model
from library.seeds import choose_seed, step_generator
from tests.engine_reference import reference_batch_loss, train_conv_out_only
from tests.test_engine import TRAINED, RandomLatents, UNetTensorsRecipe, make_parts, text_states, trained
from tests.test_train_network import lora_tensors
from tests.training import network_args, write_frog_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"))


def processor_types(unet) -> set[type]:
    return {type(p) for p in unet.attn_processors.values()}


def unet_output(unet) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), cond).sample


# --- attention -----------------------------------------------------------------------------------------------


def test_choose_seed_prefers_the_flag_then_the_resumed_state(tmp_path):
    assert choose_seed(5, None) == 5
    state = tmp_path / "s"
    state.mkdir()
    (state / "train_state.json").write_text('{"seed": 11, "current_step": 0}')
    assert choose_seed(None, str(state)) == 11
    assert 0 <= choose_seed(None, None) < 2**31


def test_sdpa_is_the_default_and_mem_eff_attn_slices_with_the_same_result(caplog):
    unet = make_tiny_model().unet
    unet.set_attention_slice("auto")
    assert attention_from_settings(AttentionSettings(), unet, CPU) == "sdpa"
    assert processor_types(unet) == {AttnProcessor2_0}
    assert attention_from_settings(AttentionSettings(), unet, CPU) == "sdpa"
    reference = unet_output(unet)
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        assert attention_from_settings(AttentionSettings(mem_eff_attn=True), unet, CPU) == "sliced"
    assert processor_types(unet) == {SlicedAttnProcessor}
    assert "--mem_eff_attn: attention is computed in slices" in caplog.text
    torch.testing.assert_close(unet_output(unet), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "device, have_xformers, message",
    [
        ("cpu", False, "--xformers: the xformers package is not installed; using PyTorch SDPA attention instead"),
        ("cpu", True, "--xformers: xformers needs a CUDA device, this run is on cpu; using SDPA instead"),
        ("cuda", False, "--xformers: the xformers package is not installed; using PyTorch SDPA attention instead"),
    ],
)
def test_xformers_falls_back_to_sdpa_with_one_warning(caplog, device, have_xformers, message):
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        choice = choose_attention(
            xformers=True, mem_eff_attn=False, device=torch.device(device), have_xformers=have_xformers
        )
    assert choice == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [message]


def test_xformers_that_cannot_be_enabled_falls_back_to_sdpa(caplog):
    """Without the package, enabling fails inside diffusers; the run goes on with SDPA (and says so)."""
    unet = make_tiny_model().unet
    unet.set_attention_slice("auto")
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        assert apply_attention(unet, "xformers") == "sdpa"
    assert processor_types(unet) == {AttnProcessor2_0}
    assert "--xformers: cannot enable xformers" in caplog.text and "using PyTorch SDPA" in caplog.text


def test_train_network_with_xformers_on_cpu_warns_and_trains(model_dir, data_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        train_network.main(network_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "1", "--xformers"))
    assert "--xformers:" in caplog.text
    assert (tmp_path / "out" / "lora.safetensors").is_file()


# --- schedule-free --------------------------------------------------------------------------------------------


def schedule_free_parts(scheduler, lr: float, sample=None) -> TrainingParts:
    parts = make_parts(scheduler, sample=sample)

    def make_optimizer(groups, total_steps):
        optimizer = schedulefree.RAdamScheduleFree(groups, lr=lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    return TrainingParts(
        encode_text=parts.encode_text,
        add_noise=parts.add_noise,
        loss=parts.loss,
        make_optimizer=make_optimizer,
        sample=sample,
    )


def schedule_free_reference(steps: int, lr: float, seed: int = 7) -> tuple[dict, dict]:
    """A hand-written RAdamScheduleFree loop: (train-mode weights, eval-mode weights) after ``steps`` steps."""
    c = make_tiny_model()
    source = RandomLatents()
    params = train_conv_out_only(c)
    parts = make_parts(c.scheduler)
    optimizer = schedulefree.RAdamScheduleFree([{"params": params}], lr=lr)
    optimizer.train()
    done, epoch = 0, 0
    while done < steps:
        for index, plan in enumerate(source.batch_plan(epoch + 1)):
            batch = source.load_batch(plan)
            reference_batch_loss(c, parts, batch, step_generator(seed, "batch", epoch, index)).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
        epoch += 1
    train_weights = trained(c)
    optimizer.eval()
    return train_weights, trained(c)


def run_schedule_free(out: Path, steps: int, lr: float, sample=None, **config):
    components = make_tiny_model()
    train(
        EngineConfig(output_dir=out, output_name="x", max_train_steps=steps, seed=7, **config),
        components,
        RandomLatents(),
        UNetTensorsRecipe(),
        schedule_free_parts(components.scheduler, lr, sample),
    )
    return load_safetensors(out / "x.safetensors")[0], trained(components)


def test_schedule_free_saves_the_eval_weights_and_training_continues(tmp_path):
    lr = 0.02
    train_ref, eval_ref = schedule_free_reference(8, lr)
    assert not torch.allclose(train_ref["conv_out.weight"], eval_ref["conv_out.weight"], atol=1e-5)
    saved, in_memory = run_schedule_free(tmp_path / "a", 8, lr)
    for key in TRAINED:
        torch.testing.assert_close(saved[key], eval_ref[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(in_memory[key], train_ref[key], rtol=0, atol=1e-6)
    seen: list[torch.Tensor] = []
    saved_often, _ = run_schedule_free(
        tmp_path / "b",
        8,
        lr,
        sample=lambda r: seen.append(r.components.unet.conv_out.bias.clone()),
        save_every_n_steps=1,
        sample_every_n_steps=6,
    )
    step2 = load_safetensors(tmp_path / "b" / "x-step00000006.safetensors")[0]
    torch.testing.assert_close(seen[0], step2["conv_out.bias"], rtol=0, atol=1e-6)
    assert len(seen) == 1
    for key in TRAINED:
        torch.testing.assert_close(saved_often[key], eval_ref[key], rtol=0, atol=1e-6)


def test_schedule_free_resume_continues_exactly(tmp_path):
    """States hold the train-mode weights; a resumed run switches the optimizer back to train mode."""
    whole, _ = run_schedule_free(tmp_path / "a", 8, 0.02, save_every_n_steps=4, save_state=True)
    state = tmp_path / "a" / "x-step00000004-state"
    resumed, _ = run_schedule_free(tmp_path / "b", 8, 0.02, save_every_n_steps=4, resume=state)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "x-step00000008.safetensors",
        "x.safetensors",
        "x_report.txt",
    ]
    for key in TRAINED:
        assert torch.equal(resumed[key], whole[key])


# --- fused backward pass -------------------------------------------------------------------------------------


def test_fused_backward_pass_gives_the_same_lora_as_a_plain_step(model_dir, data_dir, tmp_path):
    """Without clipping (per-parameter with the fused pass, global otherwise) both do the same AdamW updates."""
    common = ("--max_train_steps", "3", "--max_grad_norm", "0", "--network_train_unet_only")
    train_network.main(network_args(model_dir, data_dir, tmp_path / "plain", *common))
    train_network.main(network_args(model_dir, data_dir, tmp_path / "fused", *common, "--fused_backward_pass"))
    plain = lora_tensors(tmp_path / "plain" / "lora.safetensors")
    fused = lora_tensors(tmp_path / "fused" / "lora.safetensors")
    assert plain.keys() == fused.keys()
    for key in plain:
        torch.testing.assert_close(fused[key], plain[key], rtol=1e-5, atol=1e-7)
    up = next(k for k in plain if k.endswith("lora_up.weight"))
    assert plain[up].abs().sum() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--gradient_accumulation_steps", "2"],
            "error: --fused_backward_pass cannot accumulate gradients (--gradient_accumulation_steps 2)",
        ),
        (["--optimizer_type", "SGDNesterov"], "error: --fused_backward_pass works with AdamW and AdaFactor, not SGD"),
    ],
)
def test_fused_backward_pass_refuses_what_it_cannot_do(model_dir, data_dir, tmp_path, capsys, extra, message):
    argv = network_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "1", "--fused_backward_pass")
    code = run_cli(train_network.main, [*argv, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(message)
    assert not (tmp_path / "out" / "lora.safetensors").exists()


def test_fused_backward_pass_clips_each_parameter_on_its_own(tmp_path):
    """The engine's fused step against torch's AdamW stepped by hand with per-parameter clipping."""
    lr = 0.01

    def adamw_parts(scheduler):
        parts = make_parts(scheduler)

        def make_optimizer(groups, total_steps):
            optimizer = torch.optim.AdamW(groups, lr=lr)
            return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

        return TrainingParts(parts.encode_text, parts.add_noise, parts.loss, make_optimizer, None)

    components = make_tiny_model()
    train(
        EngineConfig(
            output_dir=tmp_path,
            output_name="x",
            max_train_steps=2,
            seed=7,
            max_grad_norm=1e-3,
            fused_backward_pass=True,
        ),
        components,
        RandomLatents(),
        UNetTensorsRecipe(),
        adamw_parts(components.scheduler),
    )
    c = make_tiny_model()
    c.unet.requires_grad_(False)
    params = list(c.unet.conv_out.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    source, parts = RandomLatents(), make_parts(c.scheduler)
    for index, plan in enumerate(source.batch_plan(1)):
        batch = source.load_batch(plan)
        noisy, noise, t, target = parts.add_noise(batch["latents"] * 0.18215, step_generator(7, "batch", 0, index))
        pred = c.unet(noisy, t, text_states(c.text_encoder, c.tokenizer, batch["captions"])).sample
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * batch["loss_weights"]
        per_sample.mean().backward()
        for p in params:
            assert torch.nn.utils.clip_grad_norm_([p], 1e-3) > 1e-3
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    expected = trained(c)
    for key in TRAINED:
        torch.testing.assert_close(trained(components)[key], expected[key], rtol=0, atol=1e-6)


# --- data loading --------------------------------------------------------------------------------------------


class PidSource:
    """Batches that record which process loaded them."""

    def batch_plan(self, epoch: int) -> list[tuple[int, int]]:
        return [(epoch, i) for i in range(3)]

    def load_batch(self, plan: tuple[int, int]) -> dict:
        return {"plan": plan, "pid": os.getpid()}


@pytest.mark.parametrize("persistent", [True, False])
def test_epoch_loader_keeps_its_workers_across_epochs_only_when_persistent(persistent):
    source = PidSource()
    loader = EpochLoader(source, workers=1, persistent=persistent)
    pids = []
    for epoch in (1, 2):
        batches = list(loader.epoch(source.batch_plan(epoch)[1:] if epoch == 1 else source.batch_plan(epoch)))
        expected = source.batch_plan(epoch)[1:] if epoch == 1 else source.batch_plan(epoch)
        assert [b["plan"] for b in batches] == expected
        assert {b["pid"] for b in batches} != {os.getpid()}
        pids.append({b["pid"] for b in batches})
    loader.close()
    assert (pids[0] == pids[1]) is persistent


def test_default_workers_are_none_for_cached_latents_and_capped_by_the_cpus():
    assert loader_workers(None, latents_cached=True, cpu_count=16) == 0
    assert loader_workers(None, latents_cached=False, cpu_count=16) == 8
    assert loader_workers(None, latents_cached=False, cpu_count=2) == 1
    assert loader_workers(4, latents_cached=True, cpu_count=2) == 2
    assert loader_workers(0, latents_cached=False, cpu_count=16) == 0


def test_persistent_workers_train_the_same_weights(tmp_path):
    def run(out, **config):
        components = make_tiny_model()
        train(
            EngineConfig(output_dir=out, output_name="x", max_train_steps=5, seed=7, **config),
            components,
            RandomLatents(),
            UNetTensorsRecipe(),
            make_parts(components.scheduler),
        )
        return trained(components)

    plain = run(tmp_path / "a", max_data_loader_n_workers=0)
    workers = run(tmp_path / "b", max_data_loader_n_workers=1, persistent_data_loader_workers=True)
    for key in TRAINED:
        assert torch.equal(workers[key], plain[key])


def test_latents_cached_comes_from_either_caching_flag(tmp_path):
    args = train_network.setup_parser().parse_args(["--output_dir", str(tmp_path), "--cache_latents_to_disk"])
    assert EngineConfig.from_args(args).latents_cached
    args.cache_latents_to_disk = False
    assert not EngineConfig.from_args(args).latents_cached
    args.cache_latents = True
    assert EngineConfig.from_args(args).latents_cached


def _record_moves(module: torch.nn.Module, moves: list, monkeypatch) -> None:
    """Record the device of every ``module.to(...)`` call (the call itself still happens)."""
    real = module.to

    def to(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "to", to)


@pytest.mark.parametrize("cached", [True, False])
def test_cached_latents_keep_the_vae_off_the_accelerator_and_images_still_train(tmp_path, monkeypatch, cached):
    """On a CPU-only machine the accelerator is the CPU, so which device the loop asks for is what is observed: the
    accelerator reports ``cpu:0`` here, a device that compares unequal to the plain ``cpu`` the VAE is parked on.
    A batch with images is then encoded where the VAE is."""
    accelerator_device = torch.device("cpu", 0)
    assert accelerator_device != CPU
    monkeypatch.setattr(Accelerator, "device", property(lambda self: accelerator_device))

    class Images(RandomLatents):
        def load_batch(self, plan):
            batch = super().load_batch(plan)
            gen = torch.Generator().manual_seed(sum(plan))
            return {**batch, "latents": None, "images": torch.rand(len(plan), 3, 64, 64, generator=gen) * 2 - 1}

    components = make_tiny_model()
    vae_moves: list = []
    unet_moves: list = []
    _record_moves(components.vae, vae_moves, monkeypatch)
    _record_moves(components.unet, unet_moves, monkeypatch)
    config = EngineConfig(
        output_dir=tmp_path / "out", output_name="x", max_train_steps=2, seed=7, latents_cached=cached
    )
    result = train(config, components, Images(), UNetTensorsRecipe(), make_parts(components.scheduler))
    assert vae_moves == [CPU if cached else accelerator_device]
    assert unet_moves == [accelerator_device]
    assert result.global_step == 2
    assert all(torch.isfinite(v).all() for v in trained(components).values())


# --- --debug_dataset -----------------------------------------------------------------------------------------


def test_debug_dataset_prints_batches_writes_pngs_and_does_not_train(model_dir, data_dir, tmp_path, capsys):
    out, shown = tmp_path / "out", tmp_path / "shown"
    argv = network_args(model_dir, data_dir, out, "--debug_dataset", "--debug_dataset_dir", str(shown))
    train_network.main([*argv, "--cache_latents"])
    printed = capsys.readouterr().out
    assert printed.count("bucket 64x64") == 4
    for i in range(4):
        assert str(data_dir / "1_frog" / f"img{i}.png") in printed
        assert f"caption: a frog, number {i}" in printed
    pngs = sorted(p.name for p in shown.iterdir())
    assert len(pngs) == 4 and all(p.startswith("e001_b") and p.endswith(".png") for p in pngs)
    assert not out.exists()
