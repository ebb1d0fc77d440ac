"""Model families: one folder per family (its transformer, loaders, key maps and family definition)."""
