"""FLUX transformer, autoencoder and text encoders in their checkpoint layouts, and their file I/O."""
