"""Evaluation: reliability, generalization, locality, generation exact match (ALGORITHMS.md §4)."""
