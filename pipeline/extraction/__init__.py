"""Layer 3: the one path from latents to features as a store holds them (extract, tune_prompt and the cost benchmark share it)."""
