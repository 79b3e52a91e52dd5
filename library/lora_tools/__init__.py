"""The logic behind sd-scripts' LoRA file tools (networks/merge_lora.py, svd_merge_lora.py, extract, resize): what
the scripts compute, with their flags parsed at the edge and the LoRA-family file format from library.lora_family."""
