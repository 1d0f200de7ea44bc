"""Scaling laws of the DiT: fits (Chinchilla's approaches 2 and 3, Epoch's refit recipe)."""
