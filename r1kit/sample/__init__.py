"""Rejection sampling: a teacher's traces, kept when the task's verifier and the filters accept them."""
