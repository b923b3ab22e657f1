"""Layer 0: errors, params, atomic file output, devices, the 19 classes, feature keys."""
