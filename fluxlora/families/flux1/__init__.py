"""FLUX.1 [dev] / [schnell] (and dev-layout derivatives such as Krea): see `family.py`."""
