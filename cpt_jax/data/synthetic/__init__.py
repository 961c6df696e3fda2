"""Synthetic image-QA benchmark that mirrors the seven continual post-training tasks."""
from cpt_jax.data.synthetic.builder import (
    SPLITS,
    SYNTHETIC_TASKS,
    CptSynthetic,
    build_synthetic,
    generate,
    load_split,
)
from cpt_jax.data.synthetic.tasks import GENERATORS, Example, generate_example
