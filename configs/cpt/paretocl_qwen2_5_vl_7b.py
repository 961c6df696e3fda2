"""ParetoCL on the seven-task continual post-training sequence (issue #8, beyond the paper).

  python -m cpt_jax.main --config=configs/cpt/paretocl_qwen2_5_vl_7b.py:ckpt=/ckpt/Qwen2.5-VL-7B-Instruct \\
      --config.data.dir=/data/tfds --workdir=gs://bucket/cpt/paretocl
  python -m cpt_jax.cl.compare gs://bucket/cpt/sft gs://bucket/cpt/rft gs://bucket/cpt/paretocl \\
      --out=/tmp/cpt_compare

Method 'paretocl' of cpt_jax/cl/loop.py (trainer `train_paretocl_stage`, model
`cpt_jax.paretocl.vlm.ParetoVLM`). The run is the 7B SFT run (configs/cpt/qwen2_5_vl_7b.py:
new-task batch sft.batch_size, sft.epochs per task) plus `config.paretocl`
(`configs.cpt.base.paretocl_config`, every value chosen, none from a paper). Same as
`qwen2_5_vl_7b.py:method=paretocl`. Args: ckpt, runlocal (as in qwen2_5_vl_7b.py).
"""
from configs import common
from configs.cpt import qwen2_5_vl_7b


def get_config(arg=None):
  arg = common.parse_arg(arg, ckpt="", runlocal=False)
  return qwen2_5_vl_7b.get_config(f"method=paretocl,ckpt={arg.ckpt},runlocal={arg.runlocal}")
