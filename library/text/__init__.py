"""Tokenizing and encoding prompts: packaged CLIP tokenizer, long-prompt chunking, clip skip, prompt weights."""
