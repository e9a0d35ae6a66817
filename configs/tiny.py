"""A seconds-long IDEAL loop for tests and smoke checks: small demo data, 1 epoch, 1 round.

python -m ideal_jax.main --config configs/tiny.py --workdir runs/tiny

Only what differs from configs/common.py's defaults is set here (the tiny model, one epoch and a
data mesh over every device are the defaults).
"""

from configs import common


def get_config(arg: str | None = None):
    cfg = common.base_config()
    cfg.rounds = 1
    # The paper's fixed step: the loop tests check each step as computed and applied; the
    # trust-region policy (the default) is tested with a scripted objective
    # (tests/test_step_policy_loop.py sets it back).
    cfg.reweight.policy = "fixed"
    cfg.reweight.step_size = 0.15
    cfg.data.demo = True
    cfg.data.demo_train_sizes = dict(arithmetic=40, reverse=120, sort=60, lookup=80, uppercase=60)
    cfg.data.demo_n_test = 8
    cfg.data.demo_n_ref = 8
    cfg.data.max_len = 64
    cfg.train.batch_size = 16
    cfg.train.seq_len = 64
    cfg.train.warmup_steps = 2
    cfg.train.log_every = 2
    cfg.train.checkpoint_every = 4  # a multiple of log_every keeps resumed curves exact
    cfg.curvature.batch_size = 16
    cfg.influence.batch_size = 16
    cfg.eval.max_new_tokens = 8
    cfg.eval.limit = 8
    common.apply_overrides(cfg, arg)
    return cfg.lock()
