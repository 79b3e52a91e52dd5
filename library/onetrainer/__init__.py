"""Read OneTrainer's ``config.json`` (its TrainConfig export) and translate it into our config TOML, dataset TOML
and sample-prompt file, listing each setting that has no equivalent here (tools/convert_onetrainer_config.py)."""
