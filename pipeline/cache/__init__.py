"""Layer 2: the feature store (Zarr v3, sharded), storage modes, data/encoded, and the readers."""
