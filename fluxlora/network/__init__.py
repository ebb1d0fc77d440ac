"""The LoRA network (networks.lora_flux) and its file formats."""
