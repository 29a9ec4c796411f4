"""Gated attention: gate kinds, the registered attention paths (reference, chunked, fused) and the scopes that change gates for a while."""
