"""fluxlora: a FLUX.1 LoRA trainer compatible with sd-scripts' flux_train_network.py."""

__version__ = "0.1.0"
