"""Settings: command-line flags and the dataset TOML, parsed and validated once into typed objects."""
