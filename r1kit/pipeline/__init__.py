"""The R1 recipe as stages: cold start, reasoning RL, rejection sampling, SFT, final RL."""
