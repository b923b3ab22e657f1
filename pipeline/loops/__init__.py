"""Layer 4: the loop each DVC stage runs (prepare ... report), read top to bottom; no loop imports another."""
