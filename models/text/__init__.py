"""Prompt encoding for text-conditioned backbones: a diffusers pipeline folder's text encoders
and tokenizers (through `transformers`), encoding equal to the pipeline's own `encode_prompt`,
the stacking of encoded prompts into a `TextContext`, and a prompt-embedding cache."""
