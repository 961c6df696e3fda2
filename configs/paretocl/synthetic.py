"""ER / ParetoCL on the project's synthetic shapes: class-incremental, 5 tasks x 2 classes.

The dataset (`cpt_synthetic_shapes`, 10 classes of 32x32 procedurally drawn shapes) is
generated into data_dir on first use. Runs in a few minutes on 2 CPU cores:

  python -m cpt_jax.main --config=configs/paretocl/synthetic.py:method=paretocl --workdir=/tmp/paretocl_synthetic

Options (`:key=value,...`): method=er|paretocl, setting=online|offline, seed, buffer (size),
data_dir, variant=default|small|tiny (dataset size: 500/100/12 train images per class).
"""
from cpt_jax.paretocl import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="paretocl", setting="online", seed=0, buffer=500,
                             data_dir="", variant="default")
  config = config_lib.base_config(method=arg.method, setting=arg.setting, seed=arg.seed,
                                  buffer_size=arg.buffer, data_dir=arg.data_dir or None)
  config.data.name = f"cpt_synthetic_shapes/{arg.variant}"
  config.data.num_tasks = 5
  config.data.classes_per_task = 2
  return config
