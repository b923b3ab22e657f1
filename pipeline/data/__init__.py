"""Layer 1: images, manifests, the synthetic benchmark and the real-dataset adapters."""
