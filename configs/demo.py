"""The embedded demo: the whole IDEAL loop on the synthetic 5-capability suite, tiny model, CPU.

    python -m ideal_jax.main --config configs/demo.py --workdir runs/demo

Options (after a colon): seeds=N repeats the loop N times (paired differences to D0 with 95%
confidence intervals), e.g.
    python -m ideal_jax.main --config configs/demo.py:seeds=5 --workdir runs/demo5
and with --config.mode=compare the same seeds train the baselines (uniform, best of k random,
RegMix, DoReMi) at D0's volume beside IDEAL → runs/demo5/comparison.json.

The starting mixture D0 is wrong in three known ways, and the reference set weights the five
capabilities equally:
  - arithmetic, needed as much as the others, is starved (400 of 6,400 examples);
  - reverse and uppercase are oversized (2,000 and 1,600) and saturate early;
  - arithmetic_wrong (600) is harmful: arithmetic's prompt format with answers off by 1-3.
A good mixer moves volume from the saturated and harmful domains to the starved capability.
Rounds keep the total fixed (equal training tokens).
"""

from configs import common


def get_config(arg: str | None = None):
    cfg = common.base_config()
    cfg.mode = "ideal"
    cfg.rounds = 2
    cfg.data.demo = True
    cfg.data.demo_train_sizes = dict(
        arithmetic=400, reverse=2000, sort=1000, lookup=800, uppercase=1600, arithmetic_wrong=600
    )
    cfg.data.demo_n_test = 200
    cfg.data.demo_n_ref = 40
    cfg.data.max_len = 96
    cfg.data.batching = "pack"
    cfg.model.preset = "tiny"
    cfg.train.epochs = 6
    cfg.train.batch_size = 16
    cfg.train.seq_len = 128
    cfg.train.learning_rate = 1e-2
    cfg.train.warmup_steps = 20
    cfg.train.log_every = 20
    cfg.train.checkpoint_every = 100
    cfg.curvature.batch_size = 32
    cfg.influence.batch_size = 32
    cfg.eval.max_new_tokens = 12
    cfg.compare.k = 4
    common.apply_overrides(cfg, arg)
    return cfg.lock()
