"""Text generation from a decoder artifact: prefill the prompt, then one token per step on the KV cache.

The artifact's manifest names the decoder's inputs and outputs (``decoder``, written by
:mod:`qcompile.flow.decoder`). The prompt is tokenized with the artifact's own ``tokenizer.json``; the
prefill runs every prompt token at once on an empty cache; each decode step runs one token and feeds the
step's ``present`` outputs back as the next ``past`` inputs. Sampling is greedy at temperature 0 (the
default, deterministic) and otherwise draws from ``softmax(logits / temperature)``, cut to the ``top_k``
likeliest tokens when ``top_k > 0``, with a seeded generator. Generation stops at an end-of-sequence token
or after ``max_new_tokens``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qcompile.errors import ArtifactError, QCompileError
from qcompile.runtime.manifest import Decoder

if TYPE_CHECKING:
    from qcompile.runtime import Session


class GenerationError(QCompileError):
    """A generation request the artifact cannot serve (bad sampling values, a prompt past the context)."""


@dataclass(frozen=True)
class Generation:
    """One generation: the text after the prompt, its tokens, and how fast each phase ran."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    stopped: str  # 'eos' or 'length'
    executor: str

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps (the first new token comes from the prefill)."""
        steps = len(self.tokens) - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _tokenizer(session: Session, decoder: Decoder) -> Any:
    if decoder.tokenizer is None:
        return None
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(session.folder / decoder.tokenizer))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens {max_new_tokens!r} is not a positive integer")
    if not np.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"temperature {temperature!r} is not a finite number >= 0 (0 is greedy)")
    if not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k {top_k!r} is not an integer >= 0 (0 keeps every token)")


def pick(logits: np.ndarray, temperature: float, top_k: int, generator: np.random.Generator) -> int:
    """The next token from one row of logits."""
    scores = logits.astype(np.float64)
    if temperature == 0:
        return int(scores.argmax())
    if 0 < top_k < scores.size:
        cut = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores >= cut, scores, -np.inf)
    scores = (scores - scores.max()) / temperature
    weights = np.exp(scores)
    return int(generator.choice(scores.size, p=weights / weights.sum()))


class Generator:
    """Drives an artifact's decoder graph token by token."""

    def __init__(self, session: Session) -> None:
        decoder = session.manifest.decoder
        if decoder is None:
            raise ArtifactError(
                f"{session.folder}: not a decoder with a KV cache (the model has no past_key_values.* inputs and "
                "present.* outputs), so it cannot generate"
                + (f"; {session.manifest.skipped['generate']}" if "generate" in session.manifest.skipped else "")
            )
        executor = session.executor if session.executor in decoder.executors else decoder.executors[0]
        self.session = session if executor == session.executor else session.with_executor(executor)
        self.decoder = decoder
        self.tokenizer = _tokenizer(session, decoder)
        infos = {info.name: info for info in self.session.inputs}
        self._cache_shapes = {past: infos[past].shape for past, _ in decoder.cache}
        self._cache_dtypes = {past: np.dtype(infos[past].dtype) for past, _ in decoder.cache}

    @property
    def executor(self) -> str:
        return self.session.executor

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError("the artifact carries no tokenizer: pass token ids (prompt_ids) instead of text")
        return list(self.tokenizer.encode(prompt).ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(str(token) for token in ids)
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        """An empty cache (no past positions) for ``batch`` sequences: what a prefill starts from."""
        cache = {}
        for name, shape in self._cache_shapes.items():
            empty = [batch if axis == 0 else size for axis, size in enumerate(shape)]
            empty[self.decoder.cache_axis] = 0
            cache[name] = np.zeros(empty, dtype=self._cache_dtypes[name])
        return cache

    def step(self, ids: list[int], cache: dict[str, np.ndarray], past: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after ``past`` cached positions: the logits of the last one, and the grown cache."""
        decoder = self.decoder
        feeds: dict[str, np.ndarray] = {decoder.input_ids: np.asarray([ids], dtype=np.int64), **cache}
        if decoder.attention_mask is not None:
            feeds[decoder.attention_mask] = np.ones((1, past + len(ids)), dtype=np.int64)
        if decoder.position_ids is not None:
            feeds[decoder.position_ids] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        outputs = self.session.run(feeds)
        grown = {past_name: outputs[present] for past_name, present in decoder.cache}
        return outputs[decoder.logits][0, -1], grown

    def generate(
        self,
        prompt: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        prompt_ids: list[int] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Generate after ``prompt`` (or ``prompt_ids``); ``on_text`` receives the text as it grows."""
        check_sampling(max_new_tokens, temperature, top_k)
        if (prompt is None) == (prompt_ids is None):
            raise GenerationError("give a prompt or prompt_ids (one of them)")
        ids = list(prompt_ids) if prompt_ids is not None else self.encode(prompt or "")
        if not ids:
            raise GenerationError("the prompt has no tokens")
        context = self.decoder.context
        if context is not None and len(ids) + max_new_tokens > context:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens and {max_new_tokens} new ones were asked for: more than the "
                f"model's context of {context} positions; shorten the prompt or lower max_new_tokens"
            )
        generator = np.random.default_rng(seed)
        eos = set(self.decoder.eos_token_ids)
        started = time.perf_counter()
        logits, cache = self.step(ids, self.empty_cache(1), 0)
        prefill_s = time.perf_counter() - started
        new = [pick(logits, temperature, top_k, generator)]
        shown = ""
        started = time.perf_counter()
        while new[-1] not in eos and len(new) < max_new_tokens:
            shown = self._stream(new, shown, on_text)
            logits, cache = self.step(new[-1:], cache, len(ids) + len(new) - 1)
            new.append(pick(logits, temperature, top_k, generator))
        decode_s = time.perf_counter() - started
        text = self.decode(new[:-1] if new[-1] in eos else new)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown) :])
        return Generation(
            text, new, len(ids), prefill_s, decode_s, "eos" if new[-1] in eos else "length", self.executor
        )

    def _stream(self, new: list[int], shown: str, on_text: Callable[[str], None] | None) -> str:
        """Pass on the text the tokens so far add to ``shown``; a partial UTF-8 character waits."""
        if on_text is None:
            return shown
        text = self.decode(new)
        if text.endswith("\ufffd") or not text.startswith(shown):
            return shown
        if len(text) > len(shown):
            on_text(text[len(shown) :])
        return text
