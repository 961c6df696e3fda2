"""Trainers: the optimizer/train-state machinery they share (optim), SFT (sft, loop)."""
