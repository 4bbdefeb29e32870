"""Evaluation as in the R1 paper: pass@1 over k samples, cons@k, pass@k."""
