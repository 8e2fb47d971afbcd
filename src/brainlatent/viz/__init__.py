"""Figures: tri-planar montages, traversal strips, GIFs and difference maps."""
