"""Loading, converting and saving Stable Diffusion 1.x/2.x models."""
