"""Loss masks count exactly the response tokens through tokenization, truncation and batching."""

import dataclasses

import chex
import numpy as np
import pytest

from ideal_jax.data import batching, formatting
from ideal_jax.data.demo_suite import build_tokenizer
from ideal_jax.data.records import Example, normalize_record
from ideal_jax.utils.errors import InputError

RECORDS = {
    "chat": {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"},
            {"role": "user", "content": "calc 2+2"},
            {"role": "assistant", "content": "4"},
        ]
    },
    "alpaca": {"instruction": "reverse", "input": "abc", "output": "cba"},
    "prompt_response": {"prompt": "upper: ab", "response": "AB"},
}
# A template whose generation prompt is NOT a prefix of the rendered conversation (trailing space).
NON_PREFIX_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers():
    plain = build_tokenizer()
    plain.chat_template = None
    broken = build_tokenizer()
    broken.chat_template = NON_PREFIX_TEMPLATE
    return {"chat": build_tokenizer(), "plain": plain, "non_prefix": broken}


def _examples(domain="d", n_copies=1, tag=False):
    out = []
    for k in range(n_copies):
        for form, record in RECORDS.items():
            ex = normalize_record(
                record, domain=domain, index=len(out), path="x", location=f"{form} {k}"
            )
            if tag:  # distinct token sequences, so a packed segment identifies its example
                (role, content), *rest = ex.messages[::-1]
                messages = tuple(rest[::-1]) + ((role, f"{content} {domain}{k}"),)
                ex = dataclasses.replace(ex, messages=messages)
            out.append(ex)
    return out


def _decode(tok, ids):
    return tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)


@pytest.mark.parametrize("template", ["chat", "plain", "non_prefix"])
def test_loss_mask_is_exactly_the_response(tokenizers, template):
    tok = tokenizers[template]
    examples = _examples()
    kept, stats = formatting.tokenize_examples(examples, tok, max_len=256)
    assert stats.n_kept == len(examples) and stats.n_truncated == 0
    assert stats.n_template_fallback == (len(examples) if template == "non_prefix" else 0)
    for ex, t in zip(examples, kept):
        chex.assert_type([t.input_ids], [np.int32])
        assert t.loss_mask.dtype == np.bool_ and t.example_id == ex.id
        assert _decode(tok, t.input_ids[t.loss_mask]) == ex.response + "<eos>"
        # the mask is one contiguous block at the end: earlier assistant turns never count
        boundary = int(np.argmax(t.loss_mask))
        assert t.loss_mask[boundary:].all() and not t.loss_mask[:boundary].any()
        prompt = _decode(tok, t.input_ids[:boundary])
        if template == "plain":
            assert prompt == "<bos>" + formatting.render_plain_prompt(ex.messages)
        else:
            gen = " " if template == "non_prefix" else ""
            convo = "".join(
                f"<|{r}|>{c}" + ("<eos>" if r == "assistant" else "") for r, c in ex.messages
            )
            assert prompt == f"<bos>{convo}<|assistant|>{gen}"


def test_truncation_left_prompt_and_drops(tokenizers):
    tok = tokenizers["chat"]
    ex = Example("e", "d", (("user", "x" * 20),), "abcdef", None, "src")
    (full,), _ = formatting.tokenize_examples([ex], tok, max_len=64)
    n_prompt = int((~full.loss_mask).sum())  # <bos><|user|> + 20 x + <|assistant|> = 23
    assert n_prompt == 23 and full.loss_mask.sum() == 7
    (cut,), stats = formatting.tokenize_examples([ex], tok, max_len=20)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[-20:])  # prompt lost from the left
    assert cut.loss_mask.sum() == 7 and stats.n_truncated == 1 and stats.n_prompt_tokens_cut == 10
    (resp,), stats = formatting.tokenize_examples([ex], tok, max_len=4)
    assert _decode(tok, resp.input_ids) == "abcd" and resp.loss_mask.all()  # then response right
    assert stats.n_response_tokens_cut == 3
    short = Example("s", "d", (("user", "q"),), "a", None, "src")
    kept, stats = formatting.tokenize_examples([ex, short], tok, max_len=6)
    assert [t.example_id for t in kept] == ["e", "s"] and stats.n_dropped_too_long == 0
    assert stats.n_dropped_no_response == 0 and stats.n_kept == 2 and stats.n_truncated == 1
    kept, stats = formatting.tokenize_examples([ex, short], tok, max_len=6, truncate="drop")
    assert [t.example_id for t in kept] == ["s"] and stats.dropped_by_domain == {"d": 1}


def test_response_truncated_away_is_dropped_and_counted(tokenizers):
    tok = tokenizers["chat"]
    long = Example("l", "a", (("user", "q" * 30),), "x", None, "src")
    ok = Example("o", "b", (("user", "q"),), "y", None, "src")
    # "right" keeps the prompt, so the response of `long` is truncated away entirely -> dropped
    with pytest.raises(InputError, match="all 1 examples of 'a' were dropped"):
        formatting.tokenize_examples([long, ok], tok, max_len=5, truncate="right")
    fine = dataclasses.replace(ok, id="f", domain="a")
    kept, stats = formatting.tokenize_examples([long, fine, ok], tok, max_len=5, truncate="right")
    assert [t.example_id for t in kept] == ["f", "o"]
    assert stats.n_dropped_no_response == 1 and stats.dropped_by_domain == {"a": 1}
    assert formatting.tokenize_example(long, tok, max_len=5, truncate="right") is None
    assert formatting.truncate_pair([1, 2, 3], [4, 5], 2, "left_prompt") == ([], [4, 5])
    assert formatting.truncate_pair([1, 2, 3], [4, 5], 4, "right") == ([1, 2, 3], [4])


def _tokenized(tok, n_copies=4):
    examples = _examples("a", n_copies, tag=True) + _examples("b", n_copies, tag=True)
    kept, _ = formatting.tokenize_examples(examples, tok, max_len=64)
    return kept


def _check_rows(tok, batch, kept):
    """Every segment is one whole example; weights are its response targets, nothing else."""
    by_ids = {tuple(t.input_ids.tolist()): t for t in kept}
    assert len(by_ids) == len(kept)
    seen = []
    names = {"a": 0, "b": 1}
    pad = batch["segment_ids"] == 0
    assert not batch["weights"][pad].any() and (batch["domain_ids"][pad] == -1).all()
    for r in range(batch["tokens"].shape[0]):
        for s in np.unique(batch["segment_ids"][r]):
            if s == 0:
                continue
            idx = np.flatnonzero(batch["segment_ids"][r] == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(idx.size))
            t = by_ids[tuple(batch["tokens"][r, idx].tolist())]
            np.testing.assert_array_equal(batch["targets"][r, idx[:-1]], t.input_ids[1:])
            np.testing.assert_array_equal(batch["weights"][r, idx], np.r_[t.loss_mask[1:], 0])
            assert (batch["domain_ids"][r, idx] == names[t.domain]).all()
            assert _decode(
                tok, batch["targets"][r][batch["weights"][r] * (batch["segment_ids"][r] == s) > 0]
            ).endswith("<eos>")
            seen.append(t.example_id)
    return seen


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_batches_cover_each_example_once_with_exact_weights(tokenizers, mode):
    tok = tokenizers["chat"]
    kept = _tokenized(tok)
    seq_len, batch_size = 64, 4
    batches = list(batching.iterate_batches(kept, batch_size, seq_len, mode, seed=0, epoch=0))
    assert len(batches) == batching.steps_per_epoch(kept, batch_size, seq_len, mode, 0, 0)
    seen = []
    for batch in batches:
        chex.assert_shape(list(batch.values()), (batch_size, seq_len))
        chex.assert_type([batch["tokens"], batch["weights"]], [np.int32, np.float32])
        seen += _check_rows(tok, batch, kept)
    assert sorted(seen) == sorted(t.example_id for t in kept)
    total = sum(float(b["weights"].sum()) for b in batches)
    assert total == sum(int(t.loss_mask[1:].sum()) for t in kept)
    if mode == "pack":
        assert max(int(b["segment_ids"].max()) for b in batches) > 1
        assert len(batches) < len(kept) / batch_size


@pytest.mark.parametrize("mode", ["pad", "pack"])
def test_iterator_is_deterministic_and_hosts_split_rows(tokenizers, mode):
    kept = _tokenized(tokenizers["chat"], n_copies=6)
    run = lambda **kw: list(batching.iterate_batches(kept, 4, 48, mode, seed=1, **kw))
    first, again, other = run(epoch=0), run(epoch=0), run(epoch=1)
    for x, y in zip(first, again):
        chex.assert_trees_all_equal(x, y)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))
    for host_count in (2, 4):
        shares = [run(epoch=0, host_index=h, host_count=host_count) for h in range(host_count)]
        for step, batch in enumerate(first):
            joined = {k: np.concatenate([s[step][k] for s in shares]) for k in batch}
            chex.assert_trees_all_equal(joined, batch)
    resumed = run(epoch=0, start_step=2)
    chex.assert_trees_all_equal(resumed, first[2:])
    with pytest.raises(ValueError, match="not divisible"):
        run(epoch=0, host_count=3)
