"""Dataset preparation scripts for fine-tuning (sd-scripts finetune/*.py)."""
