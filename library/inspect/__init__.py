"""Looking inside model and LoRA files without changing them: safetensors headers and metadata, per-module LoRA
weight statistics and the text-encoder token comparison (tools/show_metadata.py, networks/check_lora_weights.py,
networks/lora_interrogator.py)."""
