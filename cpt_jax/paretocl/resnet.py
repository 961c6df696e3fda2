"""ResNet-18 backbones for class-incremental learning (Flax NNX, NHWC).

`resnet18(nf=20)` is the reduced ResNet-18 of the continual-learning literature (GEM,
mammoth): a 3x3 stride-1 stem without max-pool, four stages of two BasicBlocks with
nf, 2nf, 4nf, 8nf channels, global average pooling -> 8 * nf = 160 features.
`resnet18(nf=64)` is the full-width CIFAR ResNet-18 (512 features).

BatchNorm is explicit: `__call__(x, train=...)` normalises with batch statistics and
updates the running averages when `train=True`, and uses the running averages otherwise,
so one graph definition serves both the jitted train step and evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm momentum 0.1 is a decay of 0.9 on the running average.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5
# He init with a plain (untruncated) normal, as torch's kaiming_normal_.
_HE_NORMAL = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
      in_ch, out_ch, (kernel, kernel), strides=(stride, stride), padding=kernel // 2,
      use_bias=False, kernel_init=_HE_NORMAL, rngs=rngs)


def _bn(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, rngs=rngs)


class BasicBlock(nnx.Module):
  """conv3x3-BN-ReLU-conv3x3-BN plus a (1x1 conv + BN when the shape changes) shortcut."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = _conv(in_ch, out_ch, 3, stride, rngs)
    self.bn1 = _bn(out_ch, rngs)
    self.conv2 = _conv(out_ch, out_ch, 3, 1, rngs)
    self.bn2 = _bn(out_ch, rngs)
    if stride != 1 or in_ch != out_ch:
      self.shortcut_conv = _conv(in_ch, out_ch, 1, stride, rngs)
      self.shortcut_bn = _bn(out_ch, rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    stats = not train
    y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=stats))
    y = self.bn2(self.conv2(y), use_running_average=stats)
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x), use_running_average=stats)
    return jax.nn.relu(y + x)


class ResNet(nnx.Module):
  """CIFAR-style ResNet feature extractor: images [B, H, W, C] -> features [B, 8 * nf]."""

  def __init__(self, *, nf: int = 20, blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
               in_channels: int = 3, rngs: nnx.Rngs):
    if nf < 1 or len(blocks_per_stage) != 4 or min(blocks_per_stage) < 1:
      raise ValueError(f"ResNet needs nf >= 1 and four stages of >= 1 blocks, got nf={nf}, "
                       f"blocks_per_stage={tuple(blocks_per_stage)}")
    self.stem_conv = _conv(in_channels, nf, 3, 1, rngs)
    self.stem_bn = _bn(nf, rngs)
    blocks = []
    in_ch = nf
    for stage, num_blocks in enumerate(blocks_per_stage):
      out_ch = nf * 2**stage
      for i in range(num_blocks):
        stride = 2 if (stage > 0 and i == 0) else 1
        blocks.append(BasicBlock(in_ch, out_ch, stride, rngs=rngs))
        in_ch = out_ch
    self.blocks = nnx.List(blocks)
    self.num_features = in_ch

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = jax.nn.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
    for block in self.blocks:
      y = block(y, train=train)
    return jnp.mean(y, axis=(1, 2))  # [B, 8 * nf]


def resnet18(nf: int = 20, *, in_channels: int = 3, rngs: nnx.Rngs) -> ResNet:
  """nf=20: reduced ResNet-18 (160-d features); nf=64: full ResNet-18 (512-d)."""
  return ResNet(nf=nf, blocks_per_stage=(2, 2, 2, 2), in_channels=in_channels, rngs=rngs)
