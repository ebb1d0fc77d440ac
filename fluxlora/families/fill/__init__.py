"""FLUX.1 Fill [dev]: FLUX.1-dev reading noisy latents ‖ masked-image latents ‖ the packed mask (384 channels)."""
