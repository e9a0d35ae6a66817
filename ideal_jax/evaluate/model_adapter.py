"""The two callables the evaluation runner needs, built over our model and tokenizer.

`make_generate_fn` turns text prompts into completions with batched KV-cache decoding
(ideal_jax.model.decoding: left-padded prompts, one jit per shape bucket); `make_loglik_fn` scores
continuations by summed log-probability with one padded forward pass per batch. Prompts are wrapped
in the tokenizer's chat template when it has one (as training formats them), else in the plain
template of ideal_jax.data.formatting.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ideal_jax.data.formatting import render_plain_prompt
from ideal_jax.model import decoding
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import Params, forward


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], use_chat_template: bool | None = None
) -> list[list[int]]:
    """Token ids of each prompt as a user turn followed by the generation prompt."""
    if use_chat_template is None:
        use_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        bos: list[int] = []
    else:
        texts = [render_plain_prompt([("user", p)]) for p in prompts]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [bos + list(ids) for ids in encoded]


def make_generate_fn(
    model_cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_prompt_len: int | None = None,
    use_chat_template: bool | None = None,
    seed: int = 0,
):
    """generate_fn(prompts, max_new_tokens, temperature, n) -> n completions per prompt."""
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    calls = [0]

    def generate_fn(
        prompts: list[str], max_new_tokens: int, temperature: float, n: int
    ) -> list[list[str]]:
        ids = encode_prompts(tokenizer, prompts, use_chat_template)
        repeated = [p for p in ids for _ in range(n)]  # n samples per prompt, adjacent
        texts: list[str] = []
        for start in range(0, len(repeated), batch_size):
            calls[0] += 1
            rng = jax.random.fold_in(jax.random.key(seed), calls[0])
            out = decoding.generate(
                model_cfg,
                params,
                repeated[start : start + batch_size],
                max_new_tokens=max_new_tokens,
                rng=rng,
                temperature=temperature,
                eos_id=eos_id,
                pad_id=pad_id,
                max_prompt_len=max_prompt_len,
            )
            texts += tokenizer.batch_decode(out, skip_special_tokens=True)
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    return generate_fn


@functools.partial(jax.jit, static_argnames=("cfg",))
def _continuation_logprob(cfg: ModelConfig, params: Params, tokens_bt, segment_bt, target_mask_bt):
    logits_btv = forward(cfg, params, tokens_bt, segment_ids_bt=segment_bt)
    logp_btv = jax.nn.log_softmax(logits_btv[:, :-1], axis=-1)
    logp_bt = jnp.take_along_axis(logp_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(logp_bt * target_mask_bt[:, 1:], axis=-1)


def make_loglik_fn(
    model_cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_len: int | None = None,
):
    """loglik_fn([(context, continuation)]) -> summed log p(continuation | context) each."""

    def loglik_fn(requests: list[tuple[str, str]]) -> list[float]:
        if not requests:
            return []
        contexts = tokenizer([c for c, _ in requests], add_special_tokens=False)["input_ids"]
        conts = tokenizer([x for _, x in requests], add_special_tokens=False)["input_ids"]
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        scores: list[float] = []
        for start in range(0, len(requests), batch_size):
            rows = [
                (bos + list(c), list(x))
                for c, x in zip(
                    contexts[start : start + batch_size], conts[start : start + batch_size]
                )
            ]
            longest = max(len(c) + len(x) for c, x in rows)
            length = decoding.bucket(longest) if max_len is None else max_len
            b = decoding.bucket(len(rows), 1)
            tokens = np.zeros((b, length), np.int32)
            segment = np.zeros((b, length), np.int32)
            target = np.zeros((b, length), np.float32)
            for i, (c, x) in enumerate(rows):
                seq = (c + x)[-length:]  # keep the continuation if something must go
                n_cont = min(len(x), len(seq))
                tokens[i, : len(seq)] = seq
                segment[i, : len(seq)] = 1
                target[i, len(seq) - n_cont : len(seq)] = 1.0
            out = _continuation_logprob(model_cfg, params, tokens, segment, target)
            scores += np.asarray(out)[: len(rows)].tolist()
        return scores

    return loglik_fn
