"""Reading audio, preparing a latent cache (in shards), reading it for training, decoded references, the demo corpus."""
