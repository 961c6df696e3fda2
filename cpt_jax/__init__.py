"""cpt_jax: continual post-training of vision-language models in JAX / Flax NNX."""
import flax

# Parameters carry logical axis names; they are placed on a mesh explicitly by
# `cpt_jax.sharding`, never eagerly when a module is constructed.
flax.config.update("flax_always_shard_variable", False)
