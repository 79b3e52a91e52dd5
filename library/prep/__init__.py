"""Dataset preparation: captioning, tagging, metadata, masks and pre-bucketed latents (finetune/, tools/)."""
