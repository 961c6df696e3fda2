"""Classic class-incremental ParetoCL: ResNet backbones, preference hypernetwork, reservoir
replay, ER and ParetoCL training (`cpt_jax.paretocl.train.run`)."""
