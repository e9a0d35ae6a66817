"""Tokenize `Example`s with a HF tokenizer and mark exactly the response tokens for the loss.

The loss mask comes from the real prompt/response boundary of each example (METHOD.md §1.4 defect 3:
the public code masked a fixed 128-token prompt). Two paths:
  * chat template: prompt = `apply_chat_template(prompt, add_generation_prompt=True)`, full =
    `apply_chat_template(prompt + [assistant response])`; every token after the prompt prefix is
    response. If the template does not render the prompt as a prefix of the full conversation (some
    templates rewrite earlier turns), the prompt and the response are tokenized separately and
    concatenated, so the boundary is still exact.
  * no chat template: a plain instruction template, `PLAIN_*` below, with BOS before and EOS after.
The response always ends with EOS (the model must learn to stop); EOS is part of the loss.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from ideal_jax.data.records import Example
from ideal_jax.utils.errors import InputError

PLAIN_SYSTEM = "{content}\n\n"
PLAIN_USER = "### Instruction:\n{content}\n\n"
PLAIN_ASSISTANT = "### Response:\n{content}\n\n"
PLAIN_GENERATION = "### Response:\n"
TRUNCATE_POLICIES = ("left_prompt", "right", "drop")


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + response; `loss_mask` is True on response tokens (EOS included)."""

    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]
    example_id: str
    domain: str

    @functools.cached_property
    def response_tokens(self) -> int:
        """Σ loss_mask, counted once per example (the influence stage reads it every round)."""
        return int(np.count_nonzero(self.loss_mask))


@dataclasses.dataclass(frozen=True)
class FormatStats:
    """What tokenization did to a set of examples; dropped examples are never trained on."""

    n_examples: int
    n_kept: int
    n_truncated: int  # kept, but lost some tokens
    n_dropped_no_response: int  # response truncated away (or no response token is a target)
    n_dropped_too_long: int  # truncate="drop" only
    n_prompt_tokens_cut: int
    n_response_tokens_cut: int
    n_template_fallback: int  # chat template did not give a prefix: tokenized in two parts
    dropped_by_domain: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def render_plain_prompt(messages: Sequence[tuple[str, str]]) -> str:
    """The prompt part in the plain template, ending with the generation prompt."""
    pieces = {"system": PLAIN_SYSTEM, "user": PLAIN_USER, "assistant": PLAIN_ASSISTANT}
    text = "".join(
        pieces.get(role, PLAIN_USER).format(content=content) for role, content in messages
    )
    return text + PLAIN_GENERATION


def _token_lists(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    # One batched call: the Rust tokenizer parallelizes it; add_special_tokens=False because the
    # chat template (or our plain path) places BOS/EOS itself. Calling the Rust backend directly
    # skips transformers' per-encoding conversion, which costs as much as the tokenization.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _per_example(examples: Sequence[Example], fn, what: str) -> list:
    """fn(examples), a batched tokenizer or template call; if it fails, the first example it
    fails on (found by calling fn on each alone) is an InputError naming its file and record,
    not a traceback from inside the tokenizer. A failure no single example reproduces is raised
    as it was (a bug, not bad data)."""
    try:
        return fn(examples)
    except Exception as batch_error:
        for ex in examples:
            try:
                fn([ex])
            except Exception as e:
                detail = " ".join(str(e).split())[:200]
                raise InputError(
                    f"{what} ({type(e).__name__}: {detail})",
                    path=ex.source or None,
                    record=ex.location or f"id {ex.id!r}",
                    field="messages",
                ) from None
        raise batch_error


def encode_prompt_response(
    examples: Sequence[Example], tokenizer: Any, *, use_chat_template: bool | None = None
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt ids, response ids) per example, untruncated; and how many needed the fallback."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: responses could never end")
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if not use_chat_template:
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        prompts = _per_example(
            examples,
            lambda exs: _token_lists(tokenizer, [render_plain_prompt(ex.messages) for ex in exs]),
            "the prompt could not be tokenized",
        )
        responses = _per_example(
            examples,
            lambda exs: _token_lists(tokenizer, [ex.response for ex in exs]),
            "the response could not be tokenized",
        )
        return [(bos + p, r + [eos]) for p, r in zip(prompts, responses)], 0

    def render(exs, full: bool):
        if full:
            convs = [ex.chat_messages() for ex in exs]
            return tokenizer.apply_chat_template(convs, tokenize=False)
        convs = [[{"role": r, "content": c} for r, c in ex.messages] for ex in exs]
        return tokenizer.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)

    prompt_texts = _per_example(
        examples, lambda exs: render(exs, False), "the chat template cannot render the prompt"
    )
    full_texts = _per_example(
        examples, lambda exs: render(exs, True), "the chat template cannot render the conversation"
    )
    prompt_ids = _token_lists(tokenizer, prompt_texts)
    full_ids = _token_lists(tokenizer, full_texts)
    pairs, n_fallback = [], 0
    for ex, p_text, f_text, p, f in zip(examples, prompt_texts, full_texts, prompt_ids, full_ids):
        if len(f) > len(p) and f[: len(p)] == p:
            response = f[len(p) :]
        else:
            # The token prefix property fails (the template rewrites the prompt, or tokens merge
            # across the boundary): tokenize the response part on its own.
            n_fallback += 1
            tail = f_text[len(p_text) :] if f_text.startswith(p_text) else ex.response
            response = _token_lists(tokenizer, [tail])[0]
        if eos not in response:
            response = response + [eos]
        pairs.append((p, response))
    return pairs, n_fallback


def truncate_pair(
    prompt: list[int], response: list[int], max_len: int, policy: str
) -> tuple[list[int], list[int]] | None:
    """Fits prompt + response into `max_len` tokens; None means "drop the example"."""
    overflow = len(prompt) + len(response) - max_len
    if overflow <= 0:
        return prompt, response
    if policy == "drop":
        return None
    if policy == "left_prompt":
        # The response is what is learned: give up prompt context (oldest first) before it.
        cut = min(overflow, len(prompt))
        prompt = prompt[cut:]
        overflow -= cut
        return prompt, response[: len(response) - overflow]
    if policy == "right":
        keep_prompt = min(len(prompt), max_len)
        return prompt[:keep_prompt], response[: max_len - keep_prompt]
    raise ValueError(f"truncate must be one of {TRUNCATE_POLICIES}, got {policy!r}")


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    *,
    max_len: int,
    truncate: str = "left_prompt",
    use_chat_template: bool | None = None,
) -> tuple[list[TokenizedExample], FormatStats]:
    """Tokenizes, truncates and masks; drops (and counts) examples left without a response target.

    A response token is trained only when it is a *target*, i.e. not the first token of the
    sequence; an example whose response has no target left is dropped, never trained with zero loss.
    Raises `InputError` when every example of a domain is dropped.
    """
    if truncate not in TRUNCATE_POLICIES:
        raise ValueError(f"truncate must be one of {TRUNCATE_POLICIES}, got {truncate!r}")
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    pairs, n_fallback = encode_prompt_response(
        examples, tokenizer, use_chat_template=use_chat_template
    )
    kept: list[TokenizedExample] = []
    dropped: Counter[str] = Counter()
    n_truncated = n_no_response = n_too_long = cut_prompt = cut_response = 0
    for ex, (prompt, response) in zip(examples, pairs):
        fitted = truncate_pair(prompt, response, max_len, truncate)
        if fitted is None:
            n_too_long += 1
            dropped[ex.domain] += 1
            continue
        new_prompt, new_response = fitted
        cut_prompt += len(prompt) - len(new_prompt)
        cut_response += len(response) - len(new_response)
        n_targets = len(new_response) - (0 if new_prompt else 1)
        if n_targets <= 0:
            n_no_response += 1
            dropped[ex.domain] += 1
            continue
        if len(new_prompt) + len(new_response) < len(prompt) + len(response):
            n_truncated += 1
        input_ids = np.asarray(new_prompt + new_response, dtype=np.int32)
        loss_mask = np.zeros(input_ids.shape, dtype=np.bool_)
        loss_mask[len(new_prompt) :] = True
        kept.append(TokenizedExample(input_ids, loss_mask, ex.id, ex.domain))
    all_domains = Counter(ex.domain for ex in examples)
    for domain, count in all_domains.items():
        if dropped[domain] == count:
            raise InputError(
                f"all {count} examples of {domain!r} were dropped by truncation to max_len="
                f"{max_len} (policy {truncate!r}); raise max_len",
                path=next(ex.source for ex in examples if ex.domain == domain) or None,
                field="response",
            )
    stats = FormatStats(
        n_examples=len(examples),
        n_kept=len(kept),
        n_truncated=n_truncated,
        n_dropped_no_response=n_no_response,
        n_dropped_too_long=n_too_long,
        n_prompt_tokens_cut=cut_prompt,
        n_response_tokens_cut=cut_response,
        n_template_fallback=n_fallback,
        dropped_by_domain={d: dropped[d] for d in all_domains if dropped[d]},
    )
    return kept, stats


def tokenize_example(
    example: Example, tokenizer: Any, *, max_len: int, truncate: str = "left_prompt"
) -> TokenizedExample | None:
    """One example; None when it would be dropped (see `tokenize_examples`)."""
    try:
        kept, _ = tokenize_examples([example], tokenizer, max_len=max_len, truncate=truncate)
    except InputError:
        return None
    return kept[0]
