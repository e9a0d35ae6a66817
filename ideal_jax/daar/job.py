"""`mode=daar` and DaaR pseudo-domains for IDEAL, from an ml_collections config.

    python -m ideal_jax.main --config configs/daar_demo.py --workdir runs/daar

The pool (cfg.daar.pool) and probe set (cfg.daar.probe) are read like any training data, with
their domain labels (if any) ignored. With the demo suite (cfg.data.demo) the pool is the demo's
training data with labels hidden and the probe set its test split. The synthetic pairs behind
the domain centroids come from the base model (generator="model", as the paper), or from a JSONL
of example pairs per domain (generator="file": for base models that cannot follow the prompt).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections import defaultdict
from typing import Any

from ideal_jax import provenance
from ideal_jax.daar import pipeline
from ideal_jax.daar.config import DaarConfig
from ideal_jax.daar.generation import ModelGenerator
from ideal_jax.data import records
from ideal_jax.data import suite as suite_lib
from ideal_jax.data.domains import load_domains
from ideal_jax.model import loading
from ideal_jax.utils.errors import InputError


def run_inputs(cfg, pool, probe) -> dict[str, str]:
    """What the DaaR artifacts of a config's run depend on besides cfg.daar's own fields (each
    stage fingerprints the fields it reads, config.STAGE_FIELDS) and the examples: the model and
    data sections (provenance.stage_inputs) and the generator."""
    inputs = provenance.stage_inputs(cfg, "daar", pipeline.examples_fingerprint(pool, probe))
    del inputs["config.daar"]
    inputs["generator"] = f"{cfg.daar.generator}:{cfg.daar.seed_pairs}"
    return inputs


class FilePairsGenerator:
    """Answers each generation prompt with a stored pair of the domain the prompt describes."""

    def __init__(
        self,
        path: str,
        descriptions: dict[str, str],
        pairs: dict[str, list[tuple[str, str]]] | None = None,
    ):
        self.descriptions = descriptions
        self.pairs: dict[str, list[tuple[str, str]]] = defaultdict(list, pairs or {})
        if pairs is None:
            self._read(path)
        missing = sorted(set(descriptions) - set(self.pairs))
        if missing:
            raise InputError(f"no seed pairs for domains {missing}", path=path, field="domain")

    def _read(self, path: str) -> None:
        try:
            with open(path) as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                    for field in ("domain", "prompt", "response"):
                        if field not in rec:
                            raise InputError(
                                "missing field", path=path, record=line_no, field=field
                            )
                    self.pairs[rec["domain"]].append((rec["prompt"], rec["response"]))
        except OSError as e:
            raise InputError(f"cannot read seed pairs ({e})", path=path) from None
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON ({e.msg})", path=path, record=e.lineno) from None

    def generate(self, prompts, temperature, top_p, max_new_tokens, seed):
        rng = random.Random(seed)
        out = []
        for prompt in prompts:
            domain = next((n for n, d in self.descriptions.items() if d in prompt), None)
            if domain is None:
                out.append("")  # counted as an empty generation by the pipeline
                continue
            instruction, response = rng.choice(self.pairs[domain])
            out.append(f"Instruction: {instruction}\nResponse: {response}")
        return out


def _unlabeled(examples_by_domain: dict[str, list[records.Example]]) -> list[records.Example]:
    return [
        dataclasses.replace(ex, domain="pool") for exs in examples_by_domain.values() for ex in exs
    ]


def load_pool(cfg, suite=None) -> tuple[list[records.Example], list[records.Example]]:
    """(pool, probe) examples with labels hidden."""
    if cfg.daar.pool:
        pool = _unlabeled(load_domains({"pool": cfg.daar.pool}))
        if not cfg.daar.probe:
            raise InputError("a probe set is required with a pool", field="daar.probe")
        probe = _unlabeled(load_domains({"probe": cfg.daar.probe}))
        return pool, probe
    if suite is None or not cfg.data.demo:
        raise InputError("set daar.pool and daar.probe (or data.demo)", field="daar.pool")
    # Demo: the training data with labels hidden; the probe set is the (disjoint) reference set.
    pool = _unlabeled(suite.domains)
    reference = [ex for exs in suite.reference.values() for ex in exs]
    probe = [
        dataclasses.replace(ex, id=f"probe:{i}", domain="probe") for i, ex in enumerate(reference)
    ]
    return pool, probe


def make_generator(cfg, model_cfg, params, suite):
    if cfg.daar.generator == "model":
        return ModelGenerator(model_cfg, params, suite.tokenizer)
    if cfg.daar.generator == "file":
        pairs = None
        if cfg.daar.seed_pairs == "demo":  # 30 training examples per demo capability
            pairs = {
                name: [(ex.messages[-1][1], ex.response) for ex in exs[:30]]
                for name, exs in suite.domains.items()
            }
        return FilePairsGenerator(cfg.daar.seed_pairs, dict(cfg.daar.domains), pairs)
    raise InputError(
        f"unknown generator {cfg.daar.generator!r} (model | file)", field="daar.generator"
    )


def run_from_config(cfg, workdir: str) -> dict[str, Any]:
    """mode=daar: select from the pool; writes WORKDIR/daar/ (manifest, selected.jsonl)."""
    from ideal_jax import sharding

    # Bad cfg.daar values fail before any data or model loads.
    daar_cfg = DaarConfig.from_section(cfg.daar)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    model_cfg, params = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    pool, probe = load_pool(cfg, suite)
    result = pipeline.run_daar(
        daar_cfg,
        model_cfg,
        params,
        suite.tokenizer,
        pool,
        probe,
        os.path.join(workdir, "daar"),
        make_generator(cfg, model_cfg, params, suite),
        mesh,
        inputs=run_inputs(cfg, pool, probe),
    )
    return {
        "manifest": result.manifest_path,
        "selected": result.selected_path,
        "selected_count": int(len(result.selected_n)),
        "probe_stats": str(result.probe_stats),
    }


def pseudo_domain_examples(cfg, workdir: str, suite, model_cfg, params, mesh):
    """IDEAL on an unlabeled pool: run (or resume) DaaR, then group the pool by pseudo-domain."""
    pool, probe = load_pool(cfg, suite)
    daar_cfg = DaarConfig.from_section(cfg.daar)
    daar_dir = os.path.join(workdir, "daar")
    pipeline.run_daar(
        daar_cfg,
        model_cfg,
        params,
        suite.tokenizer,
        pool,
        probe,
        daar_dir,
        make_generator(cfg, model_cfg, params, suite),
        mesh,
        inputs=run_inputs(cfg, pool, probe),
    )
    labels = pipeline.pseudo_domains(
        daar_cfg, model_cfg, params, suite.tokenizer, pool, daar_dir, mesh
    )
    return pipeline.relabel(pool, labels)
