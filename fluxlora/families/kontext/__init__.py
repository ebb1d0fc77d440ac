"""FLUX.1 Kontext [dev]: the FLUX.1-dev transformer fed a reference image's latent tokens beside the noisy ones."""
