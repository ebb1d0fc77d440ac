"""Chroma (lodestones): FLUX.1-schnell blocks modulated by one approximator, T5 only."""
