"""The simulated backends' prompt cache: what `usage.*_tokens_details.cached_tokens` they report.

Azure OpenAI's rules (learn.microsoft.com/azure/foundry/openai/how-to/prompt-caching): a prompt
is cached from 1,024 tokens on, the first 1,024 must be identical, and beyond them hits come in
increments of 128 identical tokens; caches are per resource and are typically cleared after 5-10
minutes of inactivity. Modelled here per backend and deployment, with the prompt as the text of
its messages (chat `messages`, or the Responses API's `instructions` then `input`) and 4
characters a token, the same approximation the simulator charges quota by: a prefix is held as
the hash of its first 4 x 1,024 characters, then of every further 4 x 128, each forgotten after
an idle spell of 5 to 10 minutes (its own, drawn from its hash, so the model is deterministic).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4
MIN_TOKENS = 1024  # shortest prefix cached
STEP_TOKENS = 128  # then in increments of this
IDLE_SECONDS = (300.0, 600.0)  # a prefix nobody used for this long (5-10 minutes) is gone
_PRUNE_EVERY = 1000  # stores between sweeps of forgotten prefixes


def prompt_text(payload: Any) -> str:
    """The prompt's text in order: chat `messages`, or `instructions` then `input` (strings or content parts)."""
    if not isinstance(payload, dict):
        return ""
    parts: list[str] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str):
        parts.append(instructions)
    messages = payload.get("messages", payload.get("input"))
    if isinstance(messages, str):
        parts.append(messages)
    elif isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "".join(parts)


def tokens(text: str) -> int:
    """Tokens of `text` by the 4-characters rule (at least 1, as Azure never reports an empty prompt)."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def prefix_hashes(text: str) -> list[tuple[int, bytes]]:
    """(tokens, hash) of every cacheable prefix of `text`: 1,024 tokens, then each further 128."""
    out: list[tuple[int, bytes]] = []
    digest = hashlib.blake2b(digest_size=16)
    done = 0
    size = MIN_TOKENS
    while size * CHARS_PER_TOKEN <= len(text):
        end = size * CHARS_PER_TOKEN
        digest.update(text[done:end].encode())
        done = end
        out.append((size, digest.copy().digest()))
        size += STEP_TOKENS
    return out


@dataclass
class PromptCache:
    """One simulated resource's prompt cache: prefix hashes per deployment and when each was last used."""

    _seen: dict[tuple[str, bytes], float] = field(default_factory=dict)  # (deployment, prefix hash) -> last use
    _stores: int = 0

    def serve(self, deployment: str | None, text: str, now: float) -> int:
        """Cached tokens of a prompt served now (the longest prefix held), and remember all its prefixes."""
        dep = deployment or ""
        cached = 0
        held = True  # a prefix is a hit only if every shorter one is: they are one computation
        for size, digest in prefix_hashes(text):
            key = (dep, digest)
            last = self._seen.get(key)
            held = held and last is not None and now - last <= _idle(digest)
            if held:
                cached = size
            self._seen[key] = now
        self._stores += 1
        if self._stores % _PRUNE_EVERY == 0:
            self._seen = {k: t for k, t in self._seen.items() if now - t <= _idle(k[1])}
        return cached

    def clear(self) -> None:
        self._seen.clear()


def _idle(digest: bytes) -> float:
    low, high = IDLE_SECONDS
    return low + (high - low) * digest[0] / 255
