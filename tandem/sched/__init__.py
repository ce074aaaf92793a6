"""Serving several requests at once: continuous batching over tandem.spec.generate's sequences."""
