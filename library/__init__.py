"""Shared core of the sd-scripts-compatible Stable Diffusion training toolkit."""
