"""Samplers: who produces the agent's tokens (HF ``generate`` today)."""
