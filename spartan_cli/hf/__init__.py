"""Hugging Face integration: loading models and tokenizers, per-architecture adapters, and the registration that lets transformers load a gated model."""
