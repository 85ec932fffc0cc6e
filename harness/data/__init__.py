"""What a cell trains on: the data-set kinds and their registry (datasets), the codec between pixels and what the
DiT sees (codec: the identity, or the SD VAE), and the latent shards written once before training (precompute)."""
