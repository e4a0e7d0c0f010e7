"""ppg: multi-turn RL for LLMs with partial policy gradients."""

__version__ = "0.1.0"
