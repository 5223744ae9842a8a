"""Shared test support: tiny models, the model-family registry and independent oracles."""
