"""Cached diffusion-feature pipeline for cross-domain semantic segmentation."""
