"""A least-recently-used cache of encoded prompts, bounded in bytes, so that a prompt asked
for again (a retry, several images of one prompt, the empty prompt of every guided request)
is not encoded again. One cache per text encoder: keys are the prompt texts."""

from __future__ import annotations

import threading
from collections import OrderedDict

from denoised.models.text.prompts import EncodedPrompt


class PromptCache:
    """At most `max_bytes` of encoded prompts (their tensors' sizes); the least recently used
    go first. `hits` and `misses` count lookups. Safe to share between threads."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be ≥ 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, EncodedPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str) -> EncodedPrompt | None:
        with self._lock:
            found = self._entries.get(prompt)
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
                self._entries.move_to_end(prompt)
            return found

    def put(self, prompt: str, encoded: EncodedPrompt) -> None:
        """Keep `encoded` as the most recent entry, dropping the oldest ones past the bound;
        an entry larger than the whole bound is not kept."""
        if encoded.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(prompt, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[prompt] = encoded
            self.nbytes += encoded.nbytes
            while self.nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes
