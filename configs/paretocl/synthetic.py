"""ER / ParetoCL on the project's synthetic shapes: class-incremental, 5 tasks x 2 classes.

The dataset (`cpt_synthetic_shapes`, 10 classes of 32x32 procedurally drawn shapes) is
generated into data_dir on first use. Runs in a few minutes on 2 CPU cores:

  python -m cpt_jax.main --config=configs/paretocl/synthetic.py:method=paretocl --workdir=/tmp/paretocl_synthetic

Options (`:key=value,...`): method=er|paretocl, setting=online|offline, seed, buffer (size),
data_dir, variant=default|small|tiny (dataset size: 500/100/12 train images per class),
clip (global-norm gradient clip; default inf = none).

No gradient clip here, unlike the paper configs (clip 1.0, from the reproduction, whose ResNet-18
starts ImageNet-pretrained; mammoth's ER does not clip): trained from scratch on this split, the
gradient norm stays at 6-10, so a clip of 1.0 shrinks every SGD step 6-10x and leaves both
methods undertrained (3 seeds, online, buffer 500: ER Acc 28.8 / ParetoCL 24.1 with the clip,
80.5 / 79.3 without; benchmarks/paretocl_synthetic{,_noclip}.json).
"""
from cpt_jax.paretocl import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="paretocl", setting="online", seed=0, buffer=500,
                             data_dir="", variant="default", clip=float("inf"))
  config = config_lib.base_config(method=arg.method, setting=arg.setting, seed=arg.seed,
                                  buffer_size=arg.buffer, data_dir=arg.data_dir or None)
  config.data.name = f"cpt_synthetic_shapes/{arg.variant}"
  config.data.num_tasks = 5
  config.data.classes_per_task = 2
  config.train.grad_clip = arg.clip
  return config
