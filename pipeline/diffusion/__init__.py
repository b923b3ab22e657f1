"""Layer 2: SD-family models (load, save, build), text, noising, taps and UNet feature passes."""
