"""The paper's setting: Llama-3.1-8B, four domains, m = 0.15, σ = 0.5, 2 rounds (METHOD.md §1).

Local paths come as arguments (nothing is downloaded):

    python -m ideal_jax.main \
      --config configs/llama3_8b_ideal.py:model=/ckpt/Llama-3.1-8B,data=/data/ideal \
      --workdir /runs/llama3_ideal

`data` is a directory holding math.jsonl, code.jsonl, reasoning.jsonl, instruction.jsonl (chat,
Alpaca or prompt/response records) and reference.jsonl (500 examples with a `capability` field).
Benchmarks are evaluated from local copies under data/benchmarks/ (see configs/README.md).
Mesh: FSDP over all devices (an 8B model's SFT state does not fit one accelerator). The paper's
curvature (gate/up/down projections, σ = 0.5, EK-FAC) and packed batches are configs/common.py's
defaults; only what differs from them is set here.
"""

import ml_collections

from configs import common
from ideal_jax.utils.errors import InputError

DOMAINS = ("math", "code", "reasoning", "instruction")


def get_config(arg: str | None = None):
    args = dict(model="/path/to/Llama-3.1-8B", data="/path/to/ideal_data")
    for item in (arg or "").split(","):
        if item:
            key, _, value = item.partition("=")
            if key not in args or not value:
                raise InputError(
                    f"unknown argument {item!r}; expected model=..., data=...", field=key
                )
            args[key] = value
    cfg = common.base_config()
    cfg.rounds = 2
    cfg.data.domains = {name: f"{args['data']}/{name}.jsonl" for name in DOMAINS}
    cfg.data.reference_source = f"{args['data']}/reference.jsonl"
    cfg.data.max_len = 2048
    cfg.model.path = args["model"]
    cfg.model.dtype = "bfloat16"
    cfg.model.remat = True
    cfg.train.epochs = 3
    cfg.train.batch_size = 128
    cfg.train.seq_len = 4096
    cfg.train.learning_rate = 1e-5
    cfg.train.warmup_steps = 50
    cfg.train.checkpoint_every = 500
    cfg.curvature.batch_size = 16
    cfg.influence.batch_size = 16
    cfg.reweight.policy = "fixed"  # the paper keeps every step
    cfg.reweight.step_size = 0.15
    cfg.eval.demo = False
    bench = f"{args['data']}/benchmarks"
    cfg.eval.tasks = ml_collections.ConfigDict(
        {
            "gsm8k": {"type": "gsm8k", "path": f"{bench}/gsm8k/test.jsonl", "num_fewshot": 4},
            "humaneval": {"type": "humaneval", "path": f"{bench}/HumanEval.jsonl.gz"},
            "bbh": {"type": "bbh", "path": f"{bench}/bbh", "num_fewshot": 3},
            "ifeval": {"type": "ifeval", "path": f"{bench}/ifeval/input_data.jsonl"},
        }
    )
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    return cfg.lock()
