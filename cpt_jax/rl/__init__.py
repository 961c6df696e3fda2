"""Reinforcement fine-tuning: rewards, GRPO math, rollout-based instance filtering."""
