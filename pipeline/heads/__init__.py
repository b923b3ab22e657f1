"""Layer 2: fusion of cached features, segmentation heads, the pixel baseline, losses, metrics."""
