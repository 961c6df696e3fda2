"""Seq-TinyImageNet (10 tasks x 20 classes, 64x64), reduced ResNet-18, ER or ParetoCL.

Tiny ImageNet is not in TFDS core; the project's `cpt_tiny_imagenet` builder reads the
official folder. Unzip tiny-imagenet-200.zip so that
`<data_dir>/downloads/manual/tiny-imagenet-200/wnids.txt` exists; the first run prepares it
(array_record under data_dir). The labelled `validation` split is the test set.

  python -m cpt_jax.main --config=configs/paretocl/seq_tinyimagenet.py:method=paretocl,data_dir=DIR --workdir=/tmp/paretocl_tin

Options: method=er|paretocl, setting=online|offline, seed, buffer, augment, data_dir.
"""
from cpt_jax.paretocl import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, method="paretocl", setting="online", seed=0, buffer=1000,
                             augment="", data_dir="")
  config = config_lib.base_config(method=arg.method, setting=arg.setting, seed=arg.seed,
                                  buffer_size=arg.buffer, data_dir=arg.data_dir or None)
  config.data.name = "cpt_tiny_imagenet"
  config.data.test_split = "validation"
  config.data.num_tasks = 10
  config.data.classes_per_task = 20
  config.data.mean = (0.4802, 0.4480, 0.3975)
  config.data.std = (0.2770, 0.2691, 0.2821)
  config.train.augment = config_lib.parse_bool(arg.augment, default=arg.setting == "offline")
  return config
