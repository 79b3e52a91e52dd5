"""The hand-written SDXL LoRA loop ``train_bench.py --model tiny-sdxl`` times ``sdxl_train_network.py`` against.

Plain diffusers/transformers calls, written from the SDXL recipe rather than from our engine: both text encoders'
penultimate hidden states joined along the width, the pooled ViT-bigG projection at the first EOS token, and the
six size numbers (original, crop, target) as ``time_ids``. Runs on CUDA when there is a GPU, as the trainer does.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sdxl_baseline(
    image_dir: Path, *, steps: int, batch_size: int, network_dim: int, network_alpha: float, lr: float, seed: int
) -> None:
    """LoRA on the UNet and both text encoders of ``tiny-sdxl``, AdamW, clipping at 1.0; prints ``steps: k/N``."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from library.models.family import family_named
    from library.models.tiny import tiny_model
    from networks.lora import create_network

    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = tiny_model(family_named("sdxl"))
    clip_l, clip_g = c.text_encoders
    for module in (c.unet, c.vae, clip_l, clip_g):
        module.requires_grad_(False)
        module.eval()
        module.to(device)
    print("model built", flush=True)
    paths = sorted(image_dir.glob("*.png"))
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    with torch.no_grad():
        latents = []
        for start in range(0, len(paths), batch_size):
            pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().to(device) / 127.5 - 1
            latents.append(c.vae.encode(images).latent_dist.sample() * c.vae.config.scaling_factor)
        latents = torch.cat(latents)
    print(f"latents: {len(paths)} encoded", flush=True)
    ids = [
        t(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
        for t in c.tokenizers
    ]
    eos_at = (ids[1] == c.tokenizers[1].eos_token_id).int().argmax(dim=1)
    height, width = latents.shape[-2] * 8, latents.shape[-1] * 8
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=device)
    network = create_network(1.0, network_dim, network_alpha, c.vae, [clip_l, clip_g], c.unet)
    network.apply_to([clip_l, clip_g], c.unet, True, True)
    network.to(device)
    groups = network.prepare_optimizer_params(None, None, lr)
    groups = groups[0] if isinstance(groups, tuple) else groups
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    batches_per_epoch = len(paths) // batch_size
    step = 0
    while step < steps:
        order = torch.randperm(len(paths))
        for b in range(batches_per_epoch):
            index = order[b * batch_size : (b + 1) * batch_size].to(device)
            x = latents[index]
            out_l = clip_l(ids[0][index], output_hidden_states=True)
            out_g = clip_g(ids[1][index], output_hidden_states=True)
            hidden = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
            rows = torch.arange(len(index), device=device)
            pooled = clip_g.text_projection(out_g.last_hidden_state[rows, eos_at[index]])
            added = {"text_embeds": pooled, "time_ids": time_ids.expand(len(index), -1)}
            noise = torch.randn_like(x)
            timesteps = torch.randint(0, c.scheduler.config.num_train_timesteps, (x.shape[0],), device=device)
            noisy = c.scheduler.add_noise(x, noise, timesteps)
            prediction = c.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            print(f"steps: {step}/{steps} loss {loss.item():.4f}", flush=True)
            if step >= steps:
                return
