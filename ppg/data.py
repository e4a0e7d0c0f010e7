"""DataModules: fresh on-policy rollouts each epoch, or logged conversations (offline)."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from ppg.jsonl import read_jsonl
from ppg.judges.base import Judge
from ppg.problems.base import Problem
from ppg.rollout import (
    HFSampler,
    Rollout,
    RolloutEngine,
    Sampler,
    Sampling,
    collate_rollouts,
    rollout_from_messages,
)
from ppg.rollout.users import ScriptedUser, UserSimulator
from ppg.types import Context


class RolloutBatches(IterableDataset):
    """Fixed, ordered batches of rollouts (groups never split across batches).

    An IterableDataset, so distributed training does not re-shard it: every rank already holds
    its own disjoint shard.
    """

    def __init__(self, rollouts: list[Rollout], batch_size: int, pad_id: int, temperature: float = 1.0):
        self.rollouts, self.batch_size = rollouts, batch_size
        self.pad_id, self.temperature = pad_id, temperature

    def __len__(self) -> int:
        return math.ceil(len(self.rollouts) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.rollouts), self.batch_size):
            yield collate_rollouts(self.rollouts[start:start + self.batch_size], self.pad_id,
                                   self.temperature)


def rollout_to_state(rollout: Rollout) -> dict:
    return dataclasses.asdict(rollout)


def rollout_from_state(state: dict) -> Rollout:
    state = dict(state)
    state["context"] = Context(**state["context"])
    state["messages"] = [tuple(m) for m in state["messages"]]
    return Rollout(**state)


class ConversationDataModule(L.LightningDataModule):
    """Base of ppg's DataModules: they serve ``RolloutBatch`` objects."""

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch.to(device)


class RolloutDataModule(ConversationDataModule):
    """Generates ``rollouts_per_epoch`` fresh conversations each epoch with the current policy.

    ``group_size`` rollouts share each context (for the leave-one-out baseline). Under DDP every
    rank generates an equal, disjoint shard. Validation and test roll out ``val_contexts``
    held-out contexts (the problem's ``test`` split), the same ones every time.

    Args:
        problem: where contexts come from.
        judge: scores every agent turn (default: the problem's own judge).
        user: the user simulator (default: scripted lines from the problem).
        n_turns: agent turns per conversation (default: the problem's).
        rollouts_per_epoch: conversations per epoch over all ranks.
        group_size: rollouts per context.
        batch_size: rollouts per training batch (a multiple of ``group_size``).
        val_contexts: held-out contexts for validation/test (0 = no validation).
        val_group_size: rollouts per held-out context.
        sampling: temperature, top_p and max new tokens per turn.
        generation_batch_size: conversations generated together.
        max_context_tokens: conversations longer than this end early.
        seed: base seed of context sampling and generation.
        progress: show a progress bar while rolling out.
        sampler: who samples the agent's turns: ``ppg.rollout.HFSampler`` (default, the policy
            itself), ``ppg.rollout.VLLMSampler`` (in-process vLLM) or ``ppg.rollout.ServedSampler``
            (an OpenAI-compatible server). The policy's adapters reach it before every rollout
            phase that follows an optimizer step (``last_sync_s``: seconds of the latest sync).
    """

    def __init__(self, problem: Problem, judge: Judge | None = None, user: UserSimulator | None = None,
                 n_turns: int | None = None, rollouts_per_epoch: int = 32, group_size: int = 4,
                 batch_size: int = 8, val_contexts: int = 8, val_group_size: int = 1,
                 sampling: Sampling | None = None, generation_batch_size: int = 32,
                 max_context_tokens: int = 2048, seed: int = 0, progress: bool = True,
                 sampler: Sampler | None = None):
        super().__init__()
        if batch_size % group_size:
            raise ValueError(f"data.batch_size ({batch_size}) must be a multiple of data.group_size ({group_size})")
        if rollouts_per_epoch % group_size:
            raise ValueError(f"data.rollouts_per_epoch ({rollouts_per_epoch}) must be a multiple of "
                             f"data.group_size ({group_size})")
        self.problem = problem
        self.judge = judge
        self.user = user or ScriptedUser()
        self.n_turns = n_turns or problem.n_turns
        self.rollouts_per_epoch, self.group_size, self.batch_size = rollouts_per_epoch, group_size, batch_size
        self.val_contexts, self.val_group_size = val_contexts, val_group_size
        self.sampling = sampling or Sampling()
        self.generation_batch_size, self.max_context_tokens = generation_batch_size, max_context_tokens
        self.seed, self.progress = seed, progress
        self.sampler = sampler or HFSampler()
        self.last_sync_s: float | None = None
        self._synced_step: int | None = None
        self.last_stats = None
        self.last_eval_rollouts: list[Rollout] = []
        self._epoch_rollouts: tuple[int, list[Rollout]] | None = None

    @property
    def epoch_rollouts(self) -> list[Rollout]:
        """This rank's training rollouts of the current epoch (empty before the first)."""
        return self._epoch_rollouts[1] if self._epoch_rollouts is not None else []

    def _engine(self, group_size: int) -> RolloutEngine:
        module = self.trainer.lightning_module
        if self.judge is None:
            self.judge = self.problem.default_judge()
        self.sampler.bind(module.policy, module.tokenizer, module.spec)
        if self._synced_step != self.trainer.global_step:  # adapters changed since the last sync
            self.last_sync_s = self.sampler.update_adapters(module.policy)
            self._synced_step = self.trainer.global_step
        return RolloutEngine(module.policy, module.tokenizer, self.judge, self.user, self.n_turns,
                             self.sampling, group_size, self.generation_batch_size,
                             self.max_context_tokens, progress=self.progress, sampler=self.sampler)

    def _shard(self, contexts: list[Context]) -> tuple[list[Context], int]:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        if len(contexts) % world:
            raise ValueError(f"{len(contexts)} contexts per epoch cannot be split evenly over {world} "
                             "ranks; make data.rollouts_per_epoch / data.group_size a multiple of the world size")
        per_rank = len(contexts) // world
        return contexts[rank * per_rank:(rank + 1) * per_rank], rank * per_rank

    def _batches(self, rollouts: list[Rollout], batch_size: int) -> DataLoader:
        module = self.trainer.lightning_module
        dataset = RolloutBatches(rollouts, batch_size, module.tokenizer.pad_token_id,
                                 self.sampling.temperature)
        return DataLoader(dataset, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch
        if self._epoch_rollouts is not None and self._epoch_rollouts[0] == epoch:
            return self._batches(self._epoch_rollouts[1], self.batch_size)  # resumed mid-epoch
        contexts = self.problem.contexts("train", self.rollouts_per_epoch // self.group_size,
                                         seed=self.seed + epoch)
        shard, first_group = self._shard(contexts)
        engine = self._engine(self.group_size)
        rollouts = engine.run(shard, seed=self._generation_seed(epoch), first_group_id=first_group)
        self.last_stats = engine.stats
        self._epoch_rollouts = (epoch, rollouts)
        return self._batches(rollouts, self.batch_size)

    def _generation_seed(self, epoch: int) -> int:
        return self.seed * 1_000_003 + epoch * 1009 + self.trainer.global_rank

    def _held_out(self) -> DataLoader:
        contexts = self.problem.contexts("test", self.val_contexts, seed=self.seed)
        shard, first_group = self._shard(contexts)
        engine = self._engine(self.val_group_size)
        rollouts = engine.run(shard, seed=self.seed + 7919 + self.trainer.global_rank,
                              first_group_id=first_group)
        self.last_eval_rollouts = rollouts
        return self._batches(rollouts, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._held_out() if self.val_contexts else []

    def test_dataloader(self) -> DataLoader:
        return self._held_out()

    def teardown(self, stage: str) -> None:
        self.sampler.close()  # stops an engine's processes; a later rollout starts it again
        self._synced_step = None

    def state_dict(self) -> dict:
        if self._epoch_rollouts is None:
            return {}
        epoch, rollouts = self._epoch_rollouts
        return {"epoch": epoch, "rollouts": [rollout_to_state(r) for r in rollouts]}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._epoch_rollouts = (state["epoch"], [rollout_from_state(r) for r in state["rollouts"]])


class LoggedConversationDataModule(ConversationDataModule):
    """Offline training on logged conversations with stored per-turn rewards.

    The loss is the same reward-weighted log-likelihood on conversations the current policy did
    not sample (no importance weights): a surrogate, not an unbiased policy gradient.

    The file is JSONL, one conversation per line, as written by ``ppg rollout``::

        {"context_id": "c1", "group_id": 0, "agent_system_prompt": "You are ...",
         "messages": [["user", "Hi"], ["assistant", "Hello!"], ["user", "..."], ...],
         "rewards": [0.8, 0.4, ...], "turn_mask": [true, true, ...]}

    ``messages`` starts with the user's opening and alternates; ``rewards`` has one entry per
    agent turn; ``turn_mask`` (optional) marks turns that happened; ``group_id`` (optional)
    groups conversations of one context for the leave-one-out baseline.
    """

    def __init__(self, path: str, batch_size: int = 8, val_path: str | None = None):
        super().__init__()
        self.path, self.batch_size, self.val_path = path, batch_size, val_path

    def _load(self, path: str) -> list[Rollout]:
        tokenizer = self.trainer.lightning_module.tokenizer
        return load_logged_conversations(path, tokenizer)

    def _batches(self, rollouts: list[Rollout]) -> DataLoader:
        pad_id = self.trainer.lightning_module.tokenizer.pad_token_id
        return DataLoader(RolloutBatches(rollouts, self.batch_size, pad_id), batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._batches(self._load(self.path))

    def val_dataloader(self) -> DataLoader:
        return self._batches(self._load(self.val_path)) if self.val_path else []


def load_logged_conversations(path: str, tokenizer) -> list[Rollout]:
    """Read a JSONL of logged conversations into rollouts (one-line errors name the line)."""
    rollouts, n_turns = [], None
    for number, record in read_jsonl(path, "logged conversations"):
        try:
            context = Context(context_id=str(record.get("context_id", number)),
                              agent_system_prompt=record["agent_system_prompt"],
                              user_system_prompt=record.get("user_system_prompt", ""),
                              opening=record["messages"][0][1], persona=record.get("persona", []))
            rollout = rollout_from_messages(tokenizer, context, [tuple(m) for m in record["messages"]],
                                            record["rewards"], record.get("turn_mask"),
                                            int(record.get("group_id", number)))
        except (ValueError, KeyError, IndexError, TypeError) as error:
            detail = f"missing key {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise ValueError(f"{path}:{number}: malformed conversation: {detail}") from None
        if n_turns is not None and len(rollout.rewards) != n_turns:
            raise ValueError(f"{path}:{number}: has {len(rollout.rewards)} rewards, earlier lines {n_turns}")
        n_turns = len(rollout.rewards)
        rollouts.append(rollout)
    return rollouts
