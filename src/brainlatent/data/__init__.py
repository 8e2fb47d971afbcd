"""Cohorts (synthetic, HCP, CSV manifest), preprocessing and datasets."""
