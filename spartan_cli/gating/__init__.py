"""Gated attention: gate kinds, the registered attention paths (reference, fused, tiled) and the scopes that change gates for a while."""
