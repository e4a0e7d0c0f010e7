"""User simulators: who answers the agent between its turns.

Every simulator answers a batch at once: ``respond(contexts, histories, turn)`` returns one
reply per conversation, or ``None`` where the user ends the conversation.
"""

from __future__ import annotations

from collections.abc import Sequence

from ppg.rollout.samplers.base import Sampling, stop_token_ids
from ppg.rollout.samplers.hf import HFSampler, chat_prompt_ids, generate_replies
from ppg.types import Context, History


def user_view(context: Context, history: History) -> list[dict]:
    """The conversation from the simulated user's side: roles swapped, the user's own prompt."""
    messages = [{"role": "system", "content": context.user_system_prompt}]
    for role, text in history:
        messages.append({"role": "assistant" if role == "user" else "user", "content": text})
    return messages


class UserSimulator:
    """Base class; ``bind`` gives model-backed simulators access to the policy when they need it."""

    def bind(self, policy, tokenizer) -> None:
        pass

    def reset(self) -> None:
        """Free per-conversation state (e.g. a KV cache) once a batch of conversations is done."""

    def respond(self, contexts: Sequence[Context], histories: Sequence[History], turn: int) -> list[str | None]:
        raise NotImplementedError


class ScriptedUser(UserSimulator):
    """Replies with the context's ``user_lines[turn]`` (e.g. the other side of a logged chat).

    When the lines run out the conversation ends, or restarts from the first line if ``cycle``.
    """

    def __init__(self, cycle: bool = False):
        self.cycle = cycle

    def respond(self, contexts, histories, turn):
        replies = []
        for context in contexts:
            lines = context.user_lines
            if turn < len(lines):
                replies.append(lines[turn])
            else:
                replies.append(lines[turn % len(lines)] if self.cycle and lines else None)
        return replies


class _ModelBackedUser(UserSimulator):
    def __init__(self, sampling: Sampling | None = None):
        self.sampling = sampling or Sampling(temperature=0.7, max_new_tokens=40)

    def _generate(self, model, tokenizer, contexts, histories) -> list[str]:
        conversations = [user_view(c, h) for c, h in zip(contexts, histories)]
        return generate_replies(model, tokenizer, conversations, self.sampling)


class SelfPlayUser(_ModelBackedUser):
    """The policy's own base model with LoRA adapters disabled, playing the user's role prompt.

    Uses the already-loaded policy (no second copy of the weights in memory). With ``reuse_cache``
    (default) each conversation keeps its tokens and KV cache from one user turn to the next: a
    turn encodes only the template tokens around what the agent said since, and the user's own
    earlier replies stay as sampled. ``reset`` (or the next ``bind``) frees the cache.
    """

    def __init__(self, sampling: Sampling | None = None, reuse_cache: bool = True):
        super().__init__(sampling)
        self.reuse_cache = reuse_cache
        self.sampler = HFSampler()
        self._tokens: dict[int, tuple[int, list[int]]] = {}  # key -> (view length, cached tokens)

    def bind(self, policy, tokenizer):
        # Deferred: the engine imports this module; the segments only need the tokenizer.
        from ppg.rollout.engine import ChatTemplateSegments

        self.policy, self.tokenizer = policy, tokenizer
        self.segments = ChatTemplateSegments(tokenizer)
        self.stops = set(stop_token_ids(tokenizer))
        self.sampler.bind(policy, tokenizer)
        self.reset()

    def reset(self) -> None:
        self.sampler.reset()
        self._tokens = {}

    def respond(self, contexts, histories, turn):
        if not hasattr(self, "policy"):
            raise RuntimeError("SelfPlayUser is not bound to a policy; the rollout engine binds it")
        views = [user_view(c, h) for c, h in zip(contexts, histories)]
        # A conversation's history is the same list from turn to turn: its id keys the cache.
        keys = [id(history) for history in histories] if self.reuse_cache else None
        if keys is None or len(set(keys)) < len(keys):  # one list for several rows: no cache
            keys, prompts = None, [chat_prompt_ids(self.tokenizer, view) for view in views]
        else:
            prompts = [self._prompt(key, view) for key, view in zip(keys, views)]
        with self.policy.disable_adapter():
            turns = self.sampler.sample(prompts, self.sampling, keys=keys)
        if keys is not None:
            self._tokens = {key: (len(view), prompt + turn.token_ids)
                            for key, view, prompt, turn in zip(keys, views, prompts, turns)}
        return [self.tokenizer.decode(t.token_ids, skip_special_tokens=True).strip() for t in turns]

    def _prompt(self, key: int, view: list[dict]) -> list[int]:
        """The cached tokens plus the agent's new line in the template, or the whole view."""
        length, tokens = self._tokens.get(key, (None, None))
        if tokens is None or length + 2 != len(view):
            return chat_prompt_ids(self.tokenizer, view)
        stop_text = self.tokenizer.decode(tokens[-1:]) if tokens[-1] in self.stops else None
        return tokens + self.segments.after_agent(view[-1]["content"], stop_text)


class ModelUser(_ModelBackedUser):
    """Any other HF causal LM as the user (loaded once, frozen, optionally quantized).

    ``device``: ``auto`` loads it on the policy's device (the trainer's) once the engine has
    bound it, else on CUDA when available, else the CPU.
    """

    def __init__(self, name_or_path: str, quantization: str = "none", sampling: Sampling | None = None,
                 device: str = "auto"):
        from ppg.models.spec import resolve_device

        super().__init__(sampling)
        resolve_device(device)  # one-line error for a bad name, now
        self.spec = {"name_or_path": name_or_path, "quantization": quantization}
        self.device = device
        self._policy_device = None
        self._model = None

    def bind(self, policy, tokenizer):
        self._policy_device = next(policy.parameters()).device

    def load_device(self):
        """Where the user model loads: the explicit ``device``, else the bound policy's."""
        from ppg.models.spec import resolve_device

        if self.device == "auto" and self._policy_device is not None:
            return self._policy_device
        return resolve_device(self.device)

    def respond(self, contexts, histories, turn):
        if self._model is None:
            from ppg.models import load_base_model

            self._model, self._tokenizer = load_base_model(self.spec, device=self.load_device())
        return self._generate(self._model, self._tokenizer, contexts, histories)


class OpenAIUser(UserSimulator):
    """A chat model behind an OpenAI-compatible endpoint (vLLM, ``transformers serve``, hosted).

    Sees the conversation from the user's side with the context's user role prompt. Requests
    run ``concurrency`` at a time through ``ppg.clients.ChatClient`` (the openai client: retries
    with backoff, timeout); persistent failure stops the rollout with a one-line
    ``EndpointError`` naming the URL. ``api_key`` falls back to ``$OPENAI_API_KEY``.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None,
                 max_tokens: int = 64, temperature: float = 0.7, timeout: float = 60.0,
                 max_retries: int = 3, concurrency: int = 4):
        from ppg.clients import ChatClient

        self.client = ChatClient(base_url, model, api_key=api_key, concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries, name="OpenAIUser")
        self.max_tokens, self.temperature = max_tokens, temperature

    def respond(self, contexts, histories, turn):
        from ppg.clients import parse_text

        bodies = [self.client.body(user_view(c, h), max_tokens=self.max_tokens, temperature=self.temperature)
                  for c, h in zip(contexts, histories)]
        return self.client.complete(bodies, parse_text, dedupe=self.temperature == 0)
