"""The dashboard's pages; each exposes ``render(store, runs)``."""
