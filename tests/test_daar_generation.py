"""DaaR pair generation: parsing under format drift, τ filtering, budget errors, real decoding."""

import random

import jax
import numpy as np
import pytest

from ideal_jax.daar import centroids, generation
from ideal_jax.data import demo_suite
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params
from ideal_jax.utils.errors import InputError


@pytest.mark.parametrize(
    "text, want",
    [
        ("Instruction: Add 2 and 3.\nResponse: 5", ("Add 2 and 3.", "5")),
        ("Sure! Here it is.\n**Instruction:** Sort 3 1\n\n**Response:** 1 3", ("Sort 3 1", "1 3")),
        ("### Instruction\n: say hi\n### Response: hi", ("say hi", "hi")),
        ("Q: what is 1+1? A: 2", ("what is 1+1?", "2")),
        ('```json\n{"instruction": "hi", "output": "hello"}\n```', ("hi", "hello")),
        ("{'prompt': 'p', 'answer': 'a'}", ("p", "a")),
        ('"instruction": "x \\"y\\"", "response": "z" and then junk', ('x "y"', "z")),
        ("Instruction: one\nResponse: two\nInstruction: three\nResponse: four", ("one", "two")),
        ("Instruction: only half", None),
        ("Response: no instruction", None),
        ("Instruction:\nResponse: empty instruction", None),
        ("random words without labels", None),
        ("{not json at all", None),
        ("   \n ", None),
    ],
)
def test_parse_pair_handles_format_drift(text, want):
    assert generation.parse_pair(text) == want


# Drifts SmolLM2-135M-Instruct produced (benchmarks/daar_smollm2_centroids.py): plural labels, and
# label words used in running text ("a suggestion and response:"), which are not labels.
@pytest.mark.parametrize(
    "text, want",
    [
        ("Instructions: Add 4 and 5.\nResponses: 9", ("Add 4 and 5.", "9")),
        ("**Questions:** What is 2+2?\n**Answers:** 4", ("What is 2+2?", "4")),
        (
            "Instruction: Sort these words.\n\nHere's a suggestion and response:\n\nThe answer",
            None,
        ),
        (
            "Instruction: Sort a b.\nHere is my answer: a b\nResponse: a b",
            ("Sort a b.\nHere is my answer: a b", "a b"),
        ),
        (
            "Instruction: Count 3 cats.\nResponse: 3, as the instruction: says",
            ("Count 3 cats.", "3, as the instruction: says"),
        ),
        ("Instruction: Add 1 and 2. Response: 3", ("Add 1 and 2.", "3")),
        ("Instruction: hi\nresponse: hello\ninstructions: more", ("hi", "hello")),
    ],
)
def test_parse_pair_small_model_drift(text, want):
    assert generation.parse_pair(text) == want


def bag_of_chars(texts):
    """Toy centroid embedding: character counts (cosine 1.0 for anagrams / repeats)."""
    out = np.zeros((len(texts), 128), np.float32)
    for i, t in enumerate(texts):
        for ch in t:
            out[i, min(ord(ch), 127)] += 1.0
    return out


def scripted(outputs):
    """A generator replaying `outputs` in order, one per prompt."""
    queue = list(outputs)
    return generation.ScriptedGenerator(lambda prompt, rng: queue.pop(0) if queue else "")


def pair(word: str) -> str:
    return f"Instruction: {word}\nResponse: {word[::-1]}"


def test_tau_accepts_dissimilar_and_rejects_similar_pairs():
    outputs = [
        pair("abc"),
        pair("abc"),  # identical: similarity 1.0, rejected
        "   ",  # empty
        "the model rambles without labels",  # unparseable
        pair("xyz"),
        pair("cab"),  # an anagram of an accepted pair under bag-of-chars: rejected
        pair("mno"),
        pair("pqr"),
        pair("stu"),
    ]
    gen = scripted(outputs)
    pairs, emb_nd, stats = generation.generate_domain_pairs(
        gen, bag_of_chars, domain="toy", description="toy words", tau=0.85, seeds=3, target=5
    )
    assert [p[0] for p in pairs] == ["abc", "xyz", "mno", "pqr", "stu"]
    assert emb_nd.shape == (5, 128)
    assert (stats.attempts, stats.empty, stats.unparseable) == (9, 1, 1)
    assert stats.rejected_similar == 2 and stats.best_rejected_similarity == pytest.approx(1.0)
    assert stats.accepted == 5 and stats.reached_target
    # Seeds: batched prompts at temperature 0.9; augmentation: single prompts at 0.95 that show
    # counter-examples.
    assert gen.calls[0]["temperature"] == 0.9 and len(gen.calls[0]["prompts"]) == 3
    augmented = [c for c in gen.calls if c["temperature"] == 0.95]
    assert augmented and all(len(c["prompts"]) == 1 for c in augmented)
    last_prompt = augmented[-1]["prompts"][0]
    assert last_prompt.count("Instruction: ") == 3 + 1  # 3 counter-examples + the format line


def test_domain_that_never_passes_tau_raises_with_best_similarity():
    gen = generation.ScriptedGenerator(lambda prompt, rng: pair("same"))
    with pytest.raises(InputError) as err:
        generation.generate_domain_pairs(
            gen, bag_of_chars, domain="mathematics", description="math", tau=0.9, max_attempts=12
        )
    message = str(err.value)
    assert "'mathematics'" in message and "accepted only 1 pairs" in message
    assert "1.0000" in message and "11 rejected as too similar" in message


def test_all_unparseable_raises_and_counts():
    outputs = ["", "blah", "Instruction: half", "", "noise"]
    with pytest.raises(InputError) as err:
        generation.generate_domain_pairs(
            scripted(outputs),
            bag_of_chars,
            domain="code",
            description="c",
            tau=0.85,
            max_attempts=5,
        )
    message = str(err.value)
    assert "2 empty, 3 unparseable" in message and "no parsed pair" in message


def test_seeded_scripted_generation_is_deterministic():
    def respond(prompt, rng):
        return pair("".join(rng.choice("abcdefghijklmnop") for _ in range(6)))

    runs = [
        generation.generate_domain_pairs(
            generation.ScriptedGenerator(respond),
            bag_of_chars,
            domain="d",
            description="d",
            tau=0.8,
            target=6,
            seed=7,
        )[0]
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and len(runs[0]) == 6


@pytest.fixture(scope="module")
def tiny_model():
    tokenizer = demo_suite.build_tokenizer()
    cfg = ModelConfig(vocab_size=len(tokenizer), num_layers=1)
    # jit: eager NNX initialization runs op by op and costs seconds on a shared CPU.
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0)), tokenizer


def test_model_generator_decodes_nonsense_counts_it_and_fails_as_designed(tiny_model):
    cfg, params, tokenizer = tiny_model
    model_gen = generation.ModelGenerator(cfg, params, tokenizer, max_prompt_len=128)
    # One sampling temperature and one prompt per call throughout: decoding compiles once per
    # (batch, temperature) and each compilation costs seconds on CPU.
    texts = model_gen.generate(["Domain: math"], 0.9, 0.95, 16, seed=0)
    assert len(texts) == 1 and isinstance(texts[0], str)
    assert texts == model_gen.generate(["Domain: math"], 0.9, 0.95, 16, seed=0)
    same_temperature = dict(seed_temperature=0.9, augment_temperature=0.9, seeds=1)

    def embed(texts):
        return centroids.embed_texts(cfg, params, tokenizer, texts, max_len=64, batch_size=8)

    # Alone, the random model never writes a parseable pair: the budget runs out, InputError.
    with pytest.raises(InputError) as err:
        generation.generate_domain_pairs(
            model_gen,
            embed,
            domain="math",
            description="math",
            tau=0.9,
            max_attempts=4,
            max_new_tokens=16,
            **same_temperature,
        )
    assert "in 4 attempts" in str(err.value) and "no parsed pair" in str(err.value)

    # Interleaved with a scripted source of valid pairs, its nonsense is counted and skipped.
    class Mixed:
        def __init__(self):
            self.i = 0

        def generate(self, prompts, temperature, top_p, max_new_tokens, seed):
            self.i += 1
            if self.i % 2:
                return model_gen.generate(prompts, temperature, top_p, max_new_tokens, seed)
            rng = random.Random(seed)
            return [pair("".join(rng.choice("abcdefgh") for _ in range(8))) for _ in prompts]

    pairs, _, stats = generation.generate_domain_pairs(
        Mixed(),
        embed,
        domain="math",
        description="math",
        tau=0.999,
        target=3,
        max_attempts=12,
        max_new_tokens=16,
        **same_temperature,
    )
    assert len(pairs) == 3 and stats.empty + stats.unparseable >= 2
    assert (
        stats.attempts == stats.accepted + stats.empty + stats.unparseable + stats.rejected_similar
    )


def test_model_generator_prefills_the_first_label_and_counts_tokens(tiny_model):
    cfg, params, tokenizer = tiny_model
    plain = generation.ModelGenerator(cfg, params, tokenizer, max_prompt_len=128, prefill="")
    model_gen = generation.ModelGenerator(cfg, params, tokenizer, max_prompt_len=128)
    prefill_ids = tokenizer("Instruction:", add_special_tokens=False)["input_ids"]
    encoded = model_gen._encode("Domain: math")
    assert encoded[-len(prefill_ids) :] == prefill_ids and encoded != plain._encode("Domain: math")
    texts = model_gen.generate(["Domain: math"], 0.9, 0.95, 16, seed=0)
    assert texts[0].startswith("Instruction:")
    assert model_gen.rows == 1 and 0 <= model_gen.tokens_generated <= 16
    assert model_gen.rows_at_limit == (model_gen.tokens_generated == 16)
    # A model that answers in the format after the prefill yields a parseable pair.
    answer = model_gen.prefill + " Add 2 and 3.\nResponse: 5"
    assert generation.parse_pair(answer) == ("Add 2 and 3.", "5")
