"""Layer 3: the loop each DVC stage runs (prepare ... report), read top to bottom."""
