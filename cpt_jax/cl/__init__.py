"""Continual-learning bookkeeping: accuracy matrix and forgetting metrics."""
