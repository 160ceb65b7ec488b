"""Experiments: scenarios run on the simulated kernel under each COW policy, and their reports."""
