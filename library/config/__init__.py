"""Command-line flags, config files and the dataset TOML schema."""
