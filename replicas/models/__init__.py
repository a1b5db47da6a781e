"""Model forward passes over the paged KV cache."""
