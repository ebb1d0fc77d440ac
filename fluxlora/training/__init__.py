"""The training step maths, optimizers, state, validation and the loop."""
