"""Image generation: the flow-matching Euler sampler and flux_minimal_inference.py."""
