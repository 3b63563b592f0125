"""Critic-free RL on verifiable rewards (GRPO family): tasks and rewards, advantages, policy losses,
rollout, and the RL trainer. One job per module; see ../shared/DESIGN.md (RL contract)."""
