"""Measuring models: held-out CE and density, the density and evaluate verbs, their reports and pictures."""
