"""evit-serve: an HTTP service for token-pruned (EViT) Vision Transformers with a per-request keep rate."""
