"""sd-scripts-compatible `networks` package: `--network_module networks.lora_flux` and the tool scripts."""
