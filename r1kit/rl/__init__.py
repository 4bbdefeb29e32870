"""GRPO: group-relative advantages, the clipped policy loss, and the rollout -> score -> update loop."""
