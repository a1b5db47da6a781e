"""The engine on one device: scheduler, paged KV cache, model runner, sampler, replica deployment."""
