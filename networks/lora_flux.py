"""`--network_module networks.lora_flux` resolves here; the network itself is fluxlora.network.lora."""

from fluxlora.network.lora import *  # noqa: F401,F403
