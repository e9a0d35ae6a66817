"""The embedded demo: the whole IDEAL loop on the synthetic 5-capability suite, tiny model, CPU.

    python -m ideal_jax.main --config configs/demo.py --workdir runs/demo

Options (after a colon): seeds=N repeats the loop N times for mean ± std, e.g.
    python -m ideal_jax.main --config configs/demo.py:seeds=3 --workdir runs/demo3

The suite's training volumes are deliberately imbalanced (reverse has 5× the data of arithmetic);
the reference set weights every capability equally, so IDEAL should move volume towards the
under-represented capabilities. Rounds keep the total fixed (equal training tokens).
"""

from configs import common


def get_config(arg: str | None = None):
    cfg = common.base_config()
    cfg.mode = "ideal"
    cfg.rounds = 2
    cfg.data.demo = True
    cfg.data.demo_train_sizes = dict(
        arithmetic=400, reverse=2000, sort=1000, lookup=800, uppercase=1600
    )
    cfg.data.demo_n_test = 100
    cfg.data.demo_n_ref = 40
    cfg.data.max_len = 96
    cfg.data.batching = "pack"
    cfg.model.preset = "tiny"
    cfg.train.epochs = 4
    cfg.train.batch_size = 16
    cfg.train.seq_len = 128
    cfg.train.learning_rate = 1e-2
    cfg.train.warmup_steps = 20
    cfg.train.log_every = 20
    cfg.train.checkpoint_every = 100
    cfg.curvature.batch_size = 32
    cfg.influence.batch_size = 32
    cfg.eval.max_new_tokens = 12
    common.apply_overrides(cfg, arg)
    return cfg.lock()
