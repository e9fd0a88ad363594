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

# The least row maximum of the compiler's per-row quantization (qcompile.passes.dynamic_rows.ROW_FLOOR, which the
# runtime, needing no compiler, does not import): a prefill's cache is quantized per position with it.
ROW_FLOOR = 2.0**-100

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
    executor: str  # the prefill's executor, and the decode steps' after a comma when they ran on another

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


def render_chat(template: str, messages: list[dict[str, str]], special: dict[str, str] | None = None) -> str:
    """A conversation as the model's chat template writes it, ending where the assistant's turn begins (Jinja in
    a sandbox: a template is data from the model's folder, not code to trust)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True, **(special or {}))


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


class StepCache:
    """The fixed-size cache of a decode-step executor (``Decoder.step_executor``) and the feeds of its steps.

    Positions ``0 .. filled - 1`` of each past buffer hold the entries so far; the rest hold zeros, which the
    attention mask's zeros hide; the mask's last position is the new token's own. Each step's present outputs
    (the new token's entries) are written in place at position ``filled``. ``buffers`` may be the executor's own
    input buffers (:meth:`qcompile.runtime.executors.TVMExecutor.input_buffer`): nothing is copied then."""

    def __init__(self, decoder: Decoder, buffers: dict[str, np.ndarray]) -> None:
        if decoder.step_capacity is None or decoder.cache_axis != 2:
            raise ArtifactError("the decoder entry names no decode-step cache on axis 2")
        self.decoder, self.capacity = decoder, decoder.step_capacity
        self.buffers = buffers
        self.filled = 0

    def start(self, cache: dict[str, np.ndarray]) -> None:
        """Fill the buffers with the entries of ``cache`` (a prefill's present outputs, by past input name)."""
        positions = next(iter(cache.values())).shape[2]
        if positions >= self.capacity:
            raise GenerationError(f"{positions} cached positions do not leave room in a cache of {self.capacity}")
        codes = self.decoder.step_cache_codes or {}
        scales = self.decoder.step_cache_scales or {}
        for past, _ in self.decoder.cache:
            buffer = self.buffers[past]
            if past in scales:
                coded, row_scales = cache_row_codes(cache[past], codes[past])
                buffer[:, :, :positions] = coded
                self.buffers[scales[past][0]][:, :, :positions] = row_scales
                self.buffers[scales[past][0]][:, :, positions:] = 0
            else:
                buffer[:, :, :positions] = cache_codes(cache[past], codes[past]) if past in codes else cache[past]
            buffer[:, :, positions:] = 0
        if self.decoder.attention_mask is not None:
            mask = self.buffers[self.decoder.attention_mask]
            mask[...] = 0
            mask[0, :positions] = 1
            mask[0, self.capacity] = 1
        self.filled = positions

    def feeds(self, token: int) -> dict[str, np.ndarray]:
        """The feeds of one step of ``token`` after the positions filled so far."""
        decoder = self.decoder
        self.buffers[decoder.input_ids][0, 0] = token
        if decoder.position_ids is not None:
            self.buffers[decoder.position_ids][0, 0] = self.filled
        return self.buffers

    def append(self, outputs: dict[str, np.ndarray]) -> None:
        """Write a step's new entries (its present outputs) at the next position."""
        if self.filled >= self.capacity:
            raise GenerationError(f"the decode-step cache of {self.capacity} positions is full")
        for past, present in self.decoder.cache:
            self.buffers[past][:, :, self.filled] = outputs[present][:, :, 0]
        for scales, output in (self.decoder.step_cache_scales or {}).values():
            self.buffers[scales][:, :, self.filled] = outputs[output][:, :, 0]
        if self.decoder.attention_mask is not None:
            self.buffers[self.decoder.attention_mask][0, self.filled] = 1
        self.filled += 1


def cache_codes(array: np.ndarray, code: list[float]) -> np.ndarray:
    """A float cache entry as the 8-bit codes of a decode-step cache (``Decoder.step_cache_codes``): multiplied
    by each multiplier in float32, divided by the scale, rounded half to even and offset by the zero point, as
    ``QuantizeLinear`` does."""
    *multipliers, scale, zero = code
    values = _multiplied(array, multipliers)
    return np.clip(np.rint(values / np.float32(scale)) + zero, 0, 255).astype(np.uint8)


def _multiplied(array: np.ndarray, multipliers: list[float]) -> np.ndarray:
    """``array`` in float32 times each multiplier in turn, as the step graph's ``Mul`` nodes compute it."""
    values = np.asarray(array, dtype=np.float32)
    for multiplier in multipliers:
        values = values * np.float32(multiplier)
    return values


def cache_row_codes(array: np.ndarray, code: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A float cache entry as the codes and per-position scales of a decode-step cache quantized per position
    (``Decoder.step_cache_scales``): multiplied by each multiplier in float32, each row (the last axis) at the
    scale ``m / limit``, ``m = max(max |row|, 2**-100)``, as the keys' chain computes it
    (:func:`qcompile.passes.dynamic_rows.row_codes`): uint8 codes offset by the zero point, float32 scales
    ``[..., 1]``."""
    *multipliers, limit, zero = code
    values = _multiplied(array, multipliers)
    bounded = np.maximum(np.abs(values).max(axis=-1, keepdims=True), np.float32(ROW_FLOOR))
    codes = np.clip(np.rint(values * (np.float32(limit) / bounded)) + zero, 0, 255).astype(np.uint8)
    return codes, (bounded / np.float32(limit)).astype(np.float32)


def step_buffers(entry: Any, infos: dict[str, Any], library: Any = None) -> dict[str, np.ndarray]:
    """The input arrays of a decode-step executor (``entry``; ``infos`` the manifest's inputs by name): its
    library's own input buffers when given (nothing is copied into it then), else new arrays."""
    own = entry.input_dtypes or {}
    buffers = {}
    for name, shape in entry.input_shapes.items():
        dtype = np.dtype(own[name] if name in own else infos[name].dtype)
        buffers[name] = (
            library.input_buffer(name, tuple(shape), dtype) if library is not None else np.zeros(shape, dtype)
        )
    return buffers


class Generator:
    """Drives an artifact's decoder graph token by token: the prefill (and a generation longer than the decode-step
    cache) on an executor that runs every length, the decode steps on the decode-step executor where there is
    one."""

    def __init__(self, session: Session) -> None:
        decoder = session.manifest.decoder
        if decoder is None:
            raise ArtifactError(
                f"{session.folder}: not a decoder with a KV cache (the model has no past_key_values.* inputs and "
                "present.* outputs), so it cannot generate"
                + (f"; {session.manifest.skipped['generate']}" if "generate" in session.manifest.skipped else "")
            )
        executor = session.executor if session.executor in decoder.executors else decoder.executors[0]
        if session.route and decoder.step_executor in session.manifest.executors and "onnxruntime" in decoder.executors:
            # On the artifact's default executor (chosen on whole windows: a prefill's measure), generate on the
            # quantized graph where a decode-step library ships: decoding is most of a generation, and the library
            # ships (--decode-step auto) when its step measured faster. SmolLM2-135M W4A8's default is fp32 (its
            # prefill graph is slower than fp32's), which decoded at 31 tokens/s against 124 on the library.
            executor = "onnxruntime"
        self.session = session if executor == session.executor else session.with_executor(executor)
        self.decoder = decoder
        self.tokenizer = _tokenizer(session, decoder)
        infos = {info.name: info for info in self.session.inputs}
        self._cache_shapes = {past: infos[past].shape for past, _ in decoder.cache}
        self._cache_dtypes = {past: np.dtype(infos[past].dtype) for past, _ in decoder.cache}
        # the step library runs the quantized graph's steps: not for a session asked to run the float model
        quantized = executor == "onnxruntime"
        self.stepper, self.step_cache = self._stepper(session, decoder, infos) if quantized else (None, None)

    @staticmethod
    def _stepper(session: Session, decoder: Decoder, infos: dict[str, Any]) -> tuple[Session | None, StepCache | None]:
        """The decode-step executor's session and its cache, where the artifact has one that runs here."""
        name = decoder.step_executor
        if name is None or name not in session.manifest.executors:
            return None, None
        entry = session.manifest.executors[name]
        if entry.cannot_run is not None or not session.runnable_here(name) or entry.input_shapes is None:
            return None, None
        try:
            stepper = session.with_executor(name)
        except ArtifactError:  # built for another CPU model, or its tiles are not granted: the steps run as before
            return None, None
        return stepper, StepCache(decoder, step_buffers(entry, infos, stepper.library))

    @property
    def executor(self) -> str:
        return self.session.executor

    def chat(self, message: str, system: str | None = None) -> str:
        """``message`` from the user (after ``system``'s instructions, if given) as the artifact's chat template
        writes it, ready for the assistant's reply."""
        decoder = self.decoder
        if decoder.chat_template is None:
            raise GenerationError(
                "the artifact carries no chat template (the model came without chat_template.jinja or a "
                "tokenizer_config.json holding one): give the prompt as plain text"
            )
        template = (self.session.folder / decoder.chat_template).read_text()
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
        return render_chat(template, messages, decoder.special_tokens)

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
        if decoder.logits_from is not None:  # the LM head multiplies the last position alone
            feeds[decoder.logits_from] = np.array([len(ids) - 1], dtype=np.int64)
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
        chat: bool = False,
        system: str | None = None,
    ) -> Generation:
        """Generate after ``prompt`` (or ``prompt_ids``); ``on_text`` receives the text as it grows. With
        ``chat``, the prompt is the user's message, written into the artifact's chat template (after
        ``system``'s instructions, if given)."""
        check_sampling(max_new_tokens, temperature, top_k)
        if (prompt is None) == (prompt_ids is None):
            raise GenerationError("give a prompt or prompt_ids (one of them)")
        if chat:
            if prompt is None:
                raise GenerationError("chat takes the user's message as the prompt, not prompt_ids")
            prompt = self.chat(prompt, system)
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
        stepper, steps = self.stepper, self.step_cache
        executor = self.executor
        if stepper is not None and steps is not None and len(ids) + max_new_tokens - 1 <= steps.capacity:
            executor = f"{self.executor}, {stepper.executor}"
            steps.start(cache)
            logits_name = self.decoder.logits
            while new[-1] not in eos and len(new) < max_new_tokens:
                shown = self._stream(new, shown, on_text)
                outputs = stepper.run(steps.feeds(new[-1]))
                steps.append(outputs)
                new.append(pick(outputs[logits_name][0, -1], temperature, top_k, generator))
        while new[-1] not in eos and len(new) < max_new_tokens:
            shown = self._stream(new, shown, on_text)
            logits, cache = self.step(new[-1:], cache, len(ids) + len(new) - 1)
            new.append(pick(logits, temperature, top_k, generator))
        decode_s = time.perf_counter() - started
        text = self.decode(new[:-1] if new[-1] in eos else new)
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown) :])
        return Generation(text, new, len(ids), prefill_s, decode_s, "eos" if new[-1] in eos else "length", executor)

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
