"""sd-scripts' runtime flags: torch.compile, fp8 base weights, DDP kwargs, DeepSpeed plugin and start-up notes."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DynamoBackend
from torch._dynamo.utils import counters

import fine_tune
import train_db
import train_network
import train_textual_inversion
from library.cli import run_cli
from library.config import runtime_flags
from library.config.runtime_flags import DistributedSettings, RuntimeSettings
from library.config.settings import settings_from_flags
from library.engine import EngineConfig
from library.engine.launch import load_base_model, model_source, prepare_run
from library.engine.tracking import make_accelerator, release_accelerator
from library.errors import UserError
from library.io import load_safetensors
from library.metadata import MetadataSettings
from library.recipes.network import NetworkRecipe
from library.recipes.settings import NetworkSettings
from tests.conftest import REPO
from tests.training import network_args, write_captioned_images, write_frog_dataset

SCRIPTS = {
    "train_network": train_network.setup_parser,
    "train_db": train_db.setup_parser,
    "fine_tune": fine_tune.setup_parser,
    "train_textual_inversion": train_textual_inversion.setup_parser,
    "train_textual_inversion_XTI": train_textual_inversion.setup_parser,  # XTI runs train_textual_inversion.main
}
FLAGS = [
    "torch_compile",
    "dynamo_backend",
    "fp8_base",
    "fp8_base_unet",
    "ddp_timeout",
    "ddp_gradient_as_bucket_view",
    "ddp_static_graph",
    "highvram",
    "cpu_offload_checkpointing",
    "deepspeed",
    "zero_stage",
    "offload_optimizer_device",
    "offload_optimizer_nvme_path",
    "offload_param_device",
    "offload_param_nvme_path",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "fp16_master_weights_and_gradients",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_frog_dataset(tmp_path_factory.mktemp("data"), count=2)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_script_has_the_flags_as_sd_scripts_defines_them(script):
    reference = json.loads((REPO / "tests" / "data" / "sd_scripts_flags.json").read_text())["scripts"][script]
    parser = SCRIPTS[script]()
    actions = {a.dest: a for a in parser._actions}
    for name in FLAGS:
        action = actions[name]
        expected = reference.get(name)
        if expected is None:  # train_network.py-only in sd-scripts (fp8_base_unet, cpu_offload_checkpointing)
            assert name in ("fp8_base_unet", "cpu_offload_checkpointing") and action.nargs == 0
            continue
        choices = action.choices
        if name == "dynamo_backend":  # ours also takes "no", which kohya_ss writes into every config
            assert choices[-1] == "no"
            choices = choices[:-1]
        assert (action.default, choices, action.nargs == 0) == (
            expected["default"],
            expected["choices"],
            expected["store_true"],
        ), name
        assert getattr(action.type, "__name__", None) == expected["type"], name


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1.5", "43201"])
def test_ddp_timeout_refuses_values_outside_0_to_43200_minutes(value):
    message = f"argument --ddp_timeout: must be a whole number from 0 to 43200, got '{value}'"
    with pytest.raises(UserError, match=re.escape(message)):
        train_network.setup_parser().parse_args(["--ddp_timeout", value])
    assert train_network.setup_parser().parse_args(["--ddp_timeout", "43200"]).ddp_timeout == 43200
    unset = train_network.setup_parser().parse_args(["--ddp_timeout", "0"])  # sd-scripts: 0 means torch's default
    settings = settings_from_flags(DistributedSettings, unset)
    assert runtime_flags.process_group_kwargs(settings.ddp_timeout) == {}
    assert runtime_flags.accelerate_kwargs_handlers(settings) == []


def test_unavailable_dynamo_backend_is_a_user_error():
    args = RuntimeSettings(torch_compile=True, dynamo_backend="tensort")
    with pytest.raises(UserError, match=r"^--dynamo_backend tensort: not available in this PyTorch; use one of eager"):
        runtime_flags.compile_options(args)
    with pytest.raises(UserError, match=r"^--torch_compile with --dynamo_backend no compiles nothing: choose a"):
        runtime_flags.compile_options(RuntimeSettings(torch_compile=True, dynamo_backend="no"))
    assert runtime_flags.compile_options(RuntimeSettings(torch_compile=False, dynamo_backend="no")) is None


class _Small(torch.nn.Module):
    """A module of our own (dynamo does not trace torch.nn's containers such as Sequential)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(x)))


@pytest.mark.parametrize("backend, aot_graphs", [("eager", 0), ("aot_eager", 1)])
def test_compile_unet_uses_the_chosen_backend_in_place(backend, aot_graphs):
    torch._dynamo.reset()
    counters.clear()
    model = _Small()
    keys = list(model.state_dict())
    options = runtime_flags.compile_unet(model, RuntimeSettings(torch_compile=True, dynamo_backend=backend))
    assert options == {"backend": backend, "mode": "default", "fullgraph": False, "dynamic": None}
    model(torch.randn(2, 3)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["aot_autograd"]["total"] == aot_graphs
    assert list(model.state_dict()) == keys  # compiled in place: saving and LoRA hooks see the same module


def test_prepare_run_compiles_the_unet_in_place(model_dir, data_dir, tmp_path):
    argv = network_args(model_dir, data_dir, tmp_path / "out", "--torch_compile", "--dynamo_backend", "aot_eager")
    args = train_network.setup_parser().parse_args(argv)
    components = load_base_model(model_source(args))
    assert components.unet._compiled_call_impl is None
    prepare_run(args, {"dreambooth"}, load=lambda seed: components)
    assert components.unet._compiled_call_impl is not None
    assert not isinstance(components.unet, torch._dynamo.eval_frame.OptimizedModule)


@pytest.mark.slow
def test_torch_compile_trains_the_same_lora_as_eager_pytorch(model_dir, data_dir, tmp_path):
    """The eager backend runs the traced graph with the same kernels: the LoRA after one step must match the
    uncompiled run to 1e-6 (observed: identical). A text-encoder LoRA keeps the trace to the UNet's own code (a UNet
    LoRA adds hooks to every layer and doubles the trace time); its gradients flow back through the compiled UNet."""
    torch._dynamo.reset()
    counters.clear()
    steps = ["--max_train_steps", "1", "--network_train_text_encoder_only"]
    train_network.main(network_args(model_dir, data_dir, tmp_path / "plain", *steps))
    assert counters["stats"]["unique_graphs"] == 0
    compiled = [*steps, "--torch_compile", "--dynamo_backend", "eager"]
    train_network.main(network_args(model_dir, data_dir, tmp_path / "compiled", *compiled))
    assert counters["stats"]["unique_graphs"] >= 1
    plain = load_safetensors(tmp_path / "plain" / "lora.safetensors")[0]
    done = load_safetensors(tmp_path / "compiled" / "lora.safetensors")[0]
    assert plain.keys() == done.keys()
    for key in plain:
        torch.testing.assert_close(done[key], plain[key], rtol=0, atol=1e-6)


def test_fp8_base_trains_a_lora_on_float8_base_weights(model_dir, data_dir, tmp_path, caplog):
    """The same steps as train_network.main, keeping the components to look at their dtypes afterwards."""
    argv = network_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "2", "--mixed_precision", "bf16")
    argv += ["--fp8_base", "--highvram", "--cpu_offload_checkpointing"]
    args = train_network.setup_parser().parse_args(argv)
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        run = prepare_run(args, {"dreambooth"})
        settings = settings_from_flags(NetworkSettings, args, metadata=settings_from_flags(MetadataSettings, args))
        recipe = NetworkRecipe(settings, run.summary)
        run.train(recipe, tracker_name="network_train")
    unet, text = run.components.unet, run.components.text_encoder
    assert unet.conv_in.weight.dtype == torch.float8_e4m3fn
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert unet.conv_norm_out.weight.dtype == torch.bfloat16
    assert text.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert text.embeddings.token_embedding.weight.dtype == torch.bfloat16
    assert {p.dtype for p in recipe.network.parameters()} == {torch.float32}
    tensors, metadata = load_safetensors(tmp_path / "out" / "lora.safetensors")
    assert metadata["ss_fp8_base"] == "True"
    assert all(torch.isfinite(t).all() for t in tensors.values())
    messages = [r.getMessage() for r in caplog.records]
    assert "fp8 base: UNet and text encoder weights stored in float8_e4m3fn, computed in torch.bfloat16" in messages
    distributed = settings_from_flags(DistributedSettings, args)
    assert runtime_flags.runtime_notes(settings_from_flags(RuntimeSettings, args), distributed, 1)[0] in messages
    assert "--cpu_offload_checkpointing applies to FLUX/SD3 only in sd-scripts; it has no effect on SD1/2" in messages


def test_fp8_base_unet_keeps_the_text_encoder(sd1):
    settings = RuntimeSettings(fp8_base=False, fp8_base_unet=True, mixed_precision="fp16")
    assert runtime_flags.apply_fp8_base(settings, sd1.unet, sd1.text_encoders) == ["UNet"]
    assert sd1.unet.conv_out.weight.dtype == torch.float8_e4m3fn
    assert sd1.text_encoder.encoder.layers[0].mlp.fc1.weight.dtype == torch.float32
    assert sd1.unet.dtype == torch.float16  # what the loop reads: it does not cast the fp8 weights back


@pytest.mark.parametrize(
    "script, extra, message",
    [
        (train_network, ["--fp8_base"], "error: --fp8_base needs --mixed_precision fp16 or bf16"),
        (train_db, ["--fp8_base_unet", "--mixed_precision", "bf16"], "error: --fp8_base_unet stores a frozen base"),
        (train_network, ["--deepspeed"], "error: --deepspeed needs the deepspeed package, which is not installed"),
    ],
)
def test_bad_runtime_flags_are_one_line_errors(script, extra, message, model_dir, data_dir, tmp_path, capsys):
    argv = network_args(model_dir, data_dir, tmp_path / "out", "--max_train_steps", "1", *extra)
    if script is train_db:
        argv = [a for a in argv if a not in ("--network_dim", "4", "--network_alpha", "2")]
    code = run_cli(script.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(message)


def test_deepspeed_without_the_package_stops_the_real_entry_script(tmp_path, monkeypatch, capsys):
    """train_network.py's own ``__main__`` block, run in this process (tests/test_cli.py runs one entry script as a
    real program)."""
    argv = ["train_network.py", "--pretrained_model_name_or_path", "tiny-sd1", "--deepspeed"]
    monkeypatch.setattr(sys, "argv", [*argv, "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "train_network.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --deepspeed needs the deepspeed package, which is not installed: pip install deepspeed "
        "(it needs CUDA), or drop --deepspeed"
    )


def test_deepspeed_refuses_gradient_accumulation_the_loop_would_double(tmp_path):
    with pytest.raises(UserError, match=r"^--deepspeed with --gradient_accumulation_steps 2: DeepSpeed accumulates"):
        EngineConfig(
            output_dir=tmp_path, distributed=DistributedSettings(deepspeed=True), gradient_accumulation_steps=2
        ).validate()


def _deepspeed_args(
    *, mixed_precision: str = "no", gradient_accumulation_steps: int = 1, max_grad_norm: float = 1.0, **changes
) -> EngineConfig:
    """The engine's config (what the accelerator set-up passes) for ``--deepspeed --train_batch_size 3``."""
    return EngineConfig(
        output_dir=Path("o"),
        train_batch_size=3,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        max_grad_norm=max_grad_norm,
        distributed=DistributedSettings(**{"deepspeed": True, **changes}),
    )


def test_deepspeed_plugin_config_matches_sd_scripts():
    plugin = runtime_flags.deepspeed_plugin(_deepspeed_args(gradient_accumulation_steps=2, max_grad_norm=0.5), 4)
    assert plugin.deepspeed_config == {
        "train_batch_size": 24,
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
        "zero_optimization": {
            "stage": 2,
            "offload_optimizer": {"device": "none", "nvme_path": None},
            "offload_param": {"device": "none", "nvme_path": None},
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "gradient_clipping": 0.5,
        "steps_per_print": float("inf"),
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
    }


def test_deepspeed_fp16_master_weights_only_with_zero2_cpu_offload(caplog):
    fp16 = {"mixed_precision": "fp16", "fp16_master_weights_and_gradients": True}
    offloaded = _deepspeed_args(offload_optimizer_device="cpu", zero_stage=2, **fp16)
    config = runtime_flags.deepspeed_plugin(offloaded, 1).deepspeed_config
    assert config["fp16"] == {
        "enabled": True,
        "auto_cast": True,
        "initial_scale_power": 0,
        "fp16_master_weights_and_grads": True,
    }
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "nvme_path": None}
    with caplog.at_level(logging.WARNING, logger="sdtrain"):
        config = runtime_flags.deepspeed_plugin(_deepspeed_args(zero_stage=3, **fp16), 1).deepspeed_config
    assert "fp16_master_weights_and_grads" not in config["fp16"] and config["zero_optimization"]["stage"] == 3
    assert "DeepSpeed supports fp16 master weights only with --zero_stage 2" in caplog.text
    assert runtime_flags.deepspeed_plugin(_deepspeed_args(deepspeed=False), 1) is None


def test_accelerator_gets_ddp_kwargs_and_no_dynamo(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    ddp = DistributedSettings(ddp_timeout=7, ddp_gradient_as_bucket_view=True, ddp_static_graph=True)
    config = EngineConfig(output_dir=tmp_path, distributed=ddp)
    accelerator = make_accelerator(config)
    try:
        assert accelerator.init_handler.timeout == datetime.timedelta(minutes=7)
        assert (accelerator.ddp_handler.gradient_as_bucket_view, accelerator.ddp_handler.static_graph) == (True, True)
        assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    finally:
        release_accelerator(accelerator)
    plain = make_accelerator(EngineConfig(output_dir=tmp_path))
    try:
        assert (plain.init_handler, plain.ddp_handler) == (None, None)
    finally:
        release_accelerator(plain)


def test_runtime_notes_name_each_flag_without_effect():
    args = train_network.setup_parser().parse_args(["--ddp_static_graph", "--ddp_timeout", "3", "--zero3_init_flag"])
    settings, distributed = settings_from_flags(RuntimeSettings, args), settings_from_flags(DistributedSettings, args)
    assert runtime_flags.runtime_notes(settings, distributed, 1) == [
        "--ddp_static_graph has no effect in a one-process run",
        "--ddp_timeout has no effect in a one-process run",
        "DeepSpeed settings (--zero_stage, --offload_*, --zero3_*) have no effect without --deepspeed",
    ]
    two = runtime_flags.runtime_notes(settings, distributed, 2)
    assert len(two) == 2 and two[0].startswith("--ddp_static_graph: passed to accelerate's DDP wrapper, but")


@pytest.mark.slow
def test_two_processes_use_the_ddp_timeout(model_dir, data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    argv = network_args(model_dir, data_dir, tmp_path / "two", "--max_train_steps", "1", "--ddp_timeout", "7")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port"]
    launch += ["29523", str(REPO / "train_network.py"), *argv, "--ddp_gradient_as_bucket_view"]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--ddp_timeout 7: process group timeout 0:07:00" in done.stderr
    assert "all 2 processes hold identical trained weights" in done.stderr


def test_fp8_base_in_textual_inversion_stores_only_the_unet(tmp_path, caplog):
    """Textual inversion trains the token embedding through the whole text encoder, which keeps float32."""
    write_captioned_images(tmp_path / "data" / "1_obj", ["a photo of mytok"] * 2)
    argv = ["--pretrained_model_name_or_path", "tiny-sd1", "--train_data_dir", str(tmp_path / "data")]
    argv += ["--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp_path / "out")]
    argv += ["--token_string", "mytok", "--init_word", "frog", "--max_train_steps", "2", "--seed", "3"]
    argv += ["--mixed_precision", "bf16", "--fp8_base", "--save_model_as", "safetensors"]
    with caplog.at_level(logging.INFO, logger="sdtrain"):
        recipe = train_textual_inversion.run(train_textual_inversion.setup_parser().parse_args(argv))
    assert "fp8 base: UNet weights stored in float8_e4m3fn, computed in torch.bfloat16" in caplog.messages
    assert recipe.embedding.weight.dtype == torch.float32
    embedding = load_safetensors(tmp_path / "out" / "mytok.safetensors")[0]["emb_params"]
    assert embedding.shape == (1, 32) and bool(torch.isfinite(embedding).all())
