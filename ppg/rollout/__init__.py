"""Rollouts: the conversation loop, its samplers, user simulators, and the training batch."""

from ppg.rollout.batch import Rollout, RolloutBatch, collate_rollouts, turn_logprobs
from ppg.rollout.engine import RolloutEngine, RolloutStats, rollout_from_messages
from ppg.rollout.samplers.base import SampledTurn, Sampler, SamplerError, Sampling
from ppg.rollout.samplers.hf import HFSampler
from ppg.rollout.samplers.served import ServedSampler
from ppg.rollout.samplers.vllm import VLLMSampler

__all__ = ["HFSampler", "Rollout", "RolloutBatch", "RolloutEngine", "RolloutStats", "SampledTurn",
           "Sampler", "SamplerError", "Sampling", "ServedSampler", "VLLMSampler",
           "collate_rollouts", "rollout_from_messages", "turn_logprobs"]
