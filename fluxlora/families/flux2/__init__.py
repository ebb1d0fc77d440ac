"""FLUX.2 [dev] and FLUX.2 [klein] 4B / 9B (base and distilled)."""
