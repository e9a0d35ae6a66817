"""Model-aware synthetic (instruction, response) pairs per domain (METHOD.md §2.1).

For each target domain, described in one sentence, the instruct model writes `seeds_per_domain`
seed pairs (temperature 0.9, top-p 0.95), then more pairs one prompt at a time, each prompt showing
3 random accepted pairs as counter-examples (temperature 0.95). A parsed pair is accepted only if
its cosine similarity (on the centroid embedding) to every accepted pair is below the domain's τ.
The seeds go through the same filter, so a model that repeats itself cannot fill the seed set with
copies.

Generations are parsed leniently ("Instruction: ... Response: ...", markdown headers, Q/A labels,
plural labels, JSON objects, code fences; a label word inside a line counts only when capitalized,
so "a suggestion and response:" is prose); an unparseable or empty generation is counted and the
loop moves on, never crashes. `ModelGenerator` starts each answer with the format's first label
("Instruction:", its `prefill`). A domain left with fewer than `min_accepted` pairs when its
attempt budget is spent raises `InputError` naming the domain, the counts and the best (lowest)
max-similarity reached.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from ideal_jax.daar.centroids import cosine_similarity, pair_text
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.decoding import generate
from ideal_jax.model.transformer import Params
from ideal_jax.utils.errors import InputError

Pair = tuple[str, str]  # (instruction, response)
FORMAT = "Instruction: <the user's request>\nResponse: <the ideal answer>"
SEED_PROMPT = (
    "You write training data for an AI assistant. Domain: {description}\n"
    "Write one new example for this domain, in exactly this format:\n" + FORMAT
)
DIVERSE_PROMPT = (
    "You write training data for an AI assistant. Domain: {description}\n"
    "Existing examples:\n\n{examples}\n\n"
    "Write one new example for this domain that is clearly different from all of the above "
    "(another topic, task type and wording), in exactly this format:\n" + FORMAT
)

_INSTRUCTION_LABELS = r"instruction|question|prompt|query|task|input|user|q"
_RESPONSE_LABELS = r"response|answer|output|solution|assistant|reply|a"
# A label: optional markdown (#, *, _), the word (or its plural), optional markdown, then ':' (or
# full-width ':'). Where it stands decides whether it is one: `_is_label`.
_LABEL = r"(?:^|(?<=\s)|(?<=[#*_>]))[#*_\s>]*\b(?P<word>{words})s?\b[*_\s]*[:：]"
_INSTRUCTION_RE = re.compile(_LABEL.format(words=_INSTRUCTION_LABELS), re.I | re.M)
_RESPONSE_RE = re.compile(_LABEL.format(words=_RESPONSE_LABELS), re.I | re.M)
_JSON_KEYS = {
    "instruction": ("instruction", "prompt", "question", "input", "query"),
    "response": ("response", "output", "answer", "completion", "solution"),
}


class Generator(Protocol):
    """Anything that turns prompts into texts: a model, an API client, a script in tests."""

    def generate(
        self,
        prompts: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]: ...


class ModelGenerator:
    """Our batched KV-cache decoding behind a HF tokenizer (chat template when it has one).

    prefill: text the answer is made to start with (appended after the chat template's assistant
    header, or after the prompt) and put back in front of every returned text. The default,
    "Instruction:", is the first label of FORMAT; it only holds the model to the format the prompt
    asks for. SmolLM2-135M-Instruct, 5 BIG-bench domains x 14 generations of <= 96 tokens
    (benchmarks/daar_smollm2_centroids.py, seed 0): 18 of 70 parseable with it, 9 of 70 without
    (and one domain with no pair at all). "" disables it.
    Counters for measurements: `tokens_generated` (new tokens, EOS excluded), `rows` and
    `rows_at_limit` (rows that ran to max_new_tokens without EOS: possibly truncated pairs).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Params,
        tokenizer: Any,
        max_prompt_len: int = 512,
        prefill: str = "Instruction:",
    ):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.max_prompt_len = max_prompt_len
        self.prefill = prefill
        self.tokens_generated = self.rows = self.rows_at_limit = 0

    def _encode(self, prompt: str) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            ids = tok(text + self.prefill, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(f"{prompt}\n{self.prefill}" if self.prefill else prompt)["input_ids"]
        return list(ids)[-self.max_prompt_len :]  # keep the instruction at the end

    def generate(
        self,
        prompts: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]:
        tok = self.tokenizer
        out = generate(
            self.cfg,
            self.params,
            [self._encode(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            rng=jax.random.key(seed),
            temperature=temperature,
            top_p=top_p,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
        )
        self.rows += len(out)
        self.tokens_generated += sum(len(ids) for ids in out)
        self.rows_at_limit += sum(len(ids) >= max_new_tokens for ids in out)
        return [self.prefill + tok.decode(ids, skip_special_tokens=True) for ids in out]


class ScriptedGenerator:
    """Test generator: `respond(prompt, rng) -> text` per prompt; records every call it gets."""

    def __init__(self, respond: Callable[[str, random.Random], str]):
        self.respond = respond
        self.calls: list[dict[str, Any]] = []

    def generate(
        self,
        prompts: list[str],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[str]:
        self.calls.append(dict(prompts=list(prompts), temperature=temperature, top_p=top_p))
        rng = random.Random(seed)
        return [self.respond(p, rng) for p in prompts]


def _strip_fences(text: str) -> str:
    return re.sub(r"```[a-zA-Z]*", "", text).strip()


def _clean(s: str) -> str:
    s = s.strip().strip("*_").strip()
    return s.strip('"').strip() if s.count('"') == 2 and s.startswith('"') else s


def _parse_json(text: str) -> tuple[str, str] | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        obj = json.loads(text[start : end + 1])
    except ValueError:
        try:  # a Python-literal dict ({'instruction': ...}) is a common drift
            obj = ast.literal_eval(text[start : end + 1])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return None
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict):
        return None
    lower = {str(k).lower(): v for k, v in obj.items()}
    found = [next((lower[k] for k in keys if k in lower), None) for keys in _JSON_KEYS.values()]
    if all(isinstance(v, str) and v.strip() for v in found):
        return found[0].strip(), found[1].strip()
    return None


def _parse_json_ish(text: str) -> tuple[str, str] | None:
    """`"instruction": "...", "response": "..."` fragments that are not valid JSON as a whole."""
    values = {}
    for role, keys in _JSON_KEYS.items():
        pattern = r"""["']?(?:{})["']?\s*[:=]\s*(["'])((?:(?!\1)[^\\]|\\.)*)\1""".format(
            "|".join(keys)
        )
        match = re.search(pattern, text, re.I | re.S)
        if match is None:
            return None
        value = match.group(2).replace('\\"', '"').replace("\\'", "'")
        values[role] = value.replace("\\n", "\n").strip()
    if values["instruction"] and values["response"]:
        return values["instruction"], values["response"]
    return None


def parse_pair(text: str) -> tuple[str, str] | None:
    """(instruction, response) from a generation, or None when no pair can be read from it."""
    if not text or not text.strip():
        return None
    text = _strip_fences(text)
    pair = _parse_json(text) if "{" in text else None
    return pair or _parse_labels(text) or _parse_json_ish(text)


def _is_label(text: str, match: re.Match) -> bool:
    """A label opens its line (after markdown), or, within a line, is capitalized ("... A: 2"):
    a lowercase label word in running text ("a suggestion and response:") is prose."""
    line_start = text.rfind("\n", 0, match.start("word")) + 1
    opens_line = not text[line_start : match.start("word")].strip(" \t#*_>")
    return opens_line or match.group("word")[0].isupper()


def _find_label(pattern: re.Pattern, text: str, pos: int = 0) -> re.Match | None:
    return next((m for m in pattern.finditer(text, pos) if _is_label(text, m)), None)


def _parse_labels(text: str) -> tuple[str, str] | None:
    """ "Instruction: ... Response: ..." and its drifts (markdown, Q/A, Input/Output, plurals)."""
    first = _find_label(_INSTRUCTION_RE, text)
    if first is None:
        return None
    answer = _find_label(_RESPONSE_RE, text, first.end())
    if answer is None:
        return None
    instruction = _clean(text[first.end() : answer.start()])
    rest = text[answer.end() :]
    # The model went on to write another pair (the first's label word again): cut it off.
    word = re.escape(first.group("word").lower())
    following = _find_label(re.compile(_LABEL.format(words=word), re.I | re.M), rest)
    response = _clean(rest[: following.start()] if following else rest)
    if not instruction or not response:
        return None
    return instruction, response


@dataclasses.dataclass
class DomainGenerationStats:
    """What generation did for one domain (written to the workdir by the pipeline)."""

    domain: str
    tau: float
    attempts: int = 0
    empty: int = 0
    unparseable: int = 0
    rejected_similar: int = 0
    accepted: int = 0
    # Lowest max-similarity of a rejected pair to the accepted set (how close to τ the misses got).
    best_rejected_similarity: float | None = None
    reached_target: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def generate_domain_pairs(
    generator: Generator,
    embed_fn: Callable[[list[str]], np.ndarray],
    *,
    domain: str,
    description: str,
    tau: float,
    seeds: int = 5,
    target: int = 10,
    min_accepted: int = 3,
    max_attempts: int = 100,
    counter_examples: int = 3,
    seed_temperature: float = 0.9,
    augment_temperature: float = 0.95,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> tuple[list[tuple[str, str]], np.ndarray, DomainGenerationStats]:
    """Accepted pairs, their [N, D] embeddings and the stats for one domain.

    `embed_fn` maps pair texts to centroid embeddings; `max_attempts` counts every generation
    (seed and augmented, parseable or not).
    """
    if not 1 <= min_accepted <= target:
        raise ValueError(f"need 1 <= min_accepted <= target, got {min_accepted}, {target}")
    # crc32, not hash(): str hashes are salted per process and would break determinism.
    rng = random.Random(seed * 1_000_003 + zlib.crc32(domain.encode()))
    stats = DomainGenerationStats(domain=domain, tau=float(tau))
    accepted: list[tuple[str, str]] = []
    accepted_embs: list[np.ndarray] = []

    def consider(texts: list[str]) -> None:
        parsed = []
        for text in texts:
            stats.attempts += 1
            pair = parse_pair(text)
            if pair is None:
                if text.strip():
                    stats.unparseable += 1
                else:
                    stats.empty += 1
                continue
            parsed.append(pair)
        if not parsed:
            return
        embs_nd = embed_fn([pair_text(*p) for p in parsed])
        for pair, emb_d in zip(parsed, embs_nd):  # sequential: later ones see earlier acceptances
            if len(accepted) >= target:
                return
            if accepted_embs:
                max_sim = float(cosine_similarity(emb_d[None], np.stack(accepted_embs)).max())
                if max_sim >= tau:
                    stats.rejected_similar += 1
                    best = stats.best_rejected_similarity
                    stats.best_rejected_similarity = max_sim if best is None else min(best, max_sim)
                    continue
            accepted.append(pair)
            accepted_embs.append(np.asarray(emb_d, np.float32))

    seed_prompt = SEED_PROMPT.format(description=description)
    while len(accepted) < min(seeds, target) and stats.attempts < max_attempts:
        n = min(seeds - len(accepted), max_attempts - stats.attempts)
        consider(
            generator.generate(
                [seed_prompt] * n, seed_temperature, top_p, max_new_tokens, rng.randrange(2**31)
            )
        )
    while len(accepted) < target and stats.attempts < max_attempts:
        shown = rng.sample(accepted, min(counter_examples, len(accepted))) if accepted else []
        examples = "\n\n".join(f"Instruction: {i}\nResponse: {r}" for i, r in shown)
        prompt = (
            DIVERSE_PROMPT.format(description=description, examples=examples)
            if shown
            else seed_prompt
        )
        consider(
            generator.generate(
                [prompt], augment_temperature, top_p, max_new_tokens, rng.randrange(2**31)
            )
        )
    stats.accepted = len(accepted)
    stats.reached_target = len(accepted) >= target
    if len(accepted) < min_accepted:
        best = stats.best_rejected_similarity
        closest = (
            f"best (lowest) max-similarity to the accepted pairs {best:.4f} vs tau {tau}"
            if best is not None
            else "no parsed pair was ever compared against tau"
        )
        raise InputError(
            f"DaaR generation for domain {domain!r} accepted only {len(accepted)} pairs "
            f"(need >= {min_accepted}) in {stats.attempts} attempts: {stats.empty} empty, "
            f"{stats.unparseable} unparseable, {stats.rejected_similar} rejected as too similar; "
            f"{closest}. Raise max_attempts_per_domain or tau, or rewrite the description.",
            field=f"daar.domains[{domain}]",
        )
    emb_nd = np.stack(accepted_embs)
    return accepted, emb_nd, stats


def generate_all_domains(
    generator: Generator,
    embed_fn: Callable[[list[str]], np.ndarray],
    domains: Sequence[dict[str, Any]],
    **kwargs: Any,
) -> tuple[dict[str, list[Pair]], dict[str, np.ndarray], dict[str, DomainGenerationStats]]:
    """`generate_domain_pairs` for each {name, description, tau} domain, in order."""
    pairs, embs, stats = {}, {}, {}
    for spec in domains:
        name = spec["name"]
        pairs[name], embs[name], stats[name] = generate_domain_pairs(
            generator,
            embed_fn,
            domain=name,
            description=spec["description"],
            tau=spec["tau"],
            **kwargs,
        )
    return pairs, embs, stats
