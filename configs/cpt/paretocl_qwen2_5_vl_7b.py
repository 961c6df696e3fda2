"""ParetoCL on the seven-task continual post-training sequence (issue #8, beyond the paper).

  python -m cpt_jax.main --config=configs/cpt/paretocl_qwen2_5_vl_7b.py:ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.dir=/data/tfds --workdir=gs://bucket/cpt/paretocl

Runs once cpt_jax/cl/loop.py registers method 'paretocl' (trainer: cpt_jax.paretocl.vlm). The
run is the 7B SFT run (configs/cpt/qwen2_5_vl_7b.py) plus `config.paretocl`, read by
`paretocl.vlm.build` / `train_task` / `make_prompt_select_step`:
  rank, hyper_hidden: low-rank LM-head update and its hypernetwork (2 -> hidden -> hidden -> rank).
  num_preferences, concentration: K preferences per step from Dirichlet(concentration) (paper K=5).
  eval_preferences, eval_seed: the fixed test-time preferences (paper K=20).
  replay_batch_size, replay_examples_per_task: replay rows per step from earlier tasks, and the
    size of each earlier task's buffer (a seeded subset, data.pipeline replay_examples_per_task).
  optim: one learning rate for backbone and adapter (optim has no per-group rate);
    freeze=('base',) trains the adapter alone. All values here are chosen, none from a paper.
Args: ckpt, runlocal (as in qwen2_5_vl_7b.py).
"""
from configs import common
from configs.cpt import qwen2_5_vl_7b


def get_config(arg=None):
  arg = common.parse_arg(arg, ckpt="", runlocal=False)
  c = qwen2_5_vl_7b.get_config(f"method=sft,ckpt={arg.ckpt},runlocal={arg.runlocal}")
  c.method = "paretocl"
  c.paretocl = dict(
      rank=16, hyper_hidden=100,
      num_preferences=5, concentration=1.0,
      eval_preferences=20, eval_seed=0,
      replay_batch_size=c.sft.batch_size // 2, replay_examples_per_task=1000,
      optim=common.optim_config(lr=1e-5, schedule="cosine", warmup_ratio=0.1,
                                weight_decay=0.0, grad_clip_norm=1.0),
  )
  if arg.runlocal:
    c.paretocl.update(replay_batch_size=4, replay_examples_per_task=8)
  return c
