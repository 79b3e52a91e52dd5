"""What plugs into the shared training loop (``library.engine``): the LoRA-family network, full-model and textual
inversion recipes, each configured with typed settings read from the flags at the entry script."""
