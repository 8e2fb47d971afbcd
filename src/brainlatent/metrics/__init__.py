"""Reconstruction, generative and anatomical metrics."""
