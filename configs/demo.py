"""The embedded demo: the whole IDEAL loop on the synthetic 5-capability suite, tiny model, CPU.

    python -m ideal_jax.main --config configs/demo.py --workdir runs/demo

Options (after a colon): seeds=N repeats the loop N times (paired differences to D0 with 95%
confidence intervals), e.g.
    python -m ideal_jax.main --config configs/demo.py:seeds=5 --workdir runs/demo5
and with --config.mode=compare the same seeds train the baselines (uniform, best of k random,
RegMix, DoReMi) at D0's volume beside IDEAL → runs/demo5/comparison.json.

The suite (ideal_jax/data/demo_suite.py, v3): five capabilities, each a fixed table of 64 facts
whose rows the training domain shows with graded frequencies, so that accuracy grows smoothly with
volume (docs/demo_results.md: curves, seed spread). Each table is split per seed into 24 dev rows
(the reference set: IDEAL's α, random's best-of-k and RegMix's fit all read it) and 40 disjoint
test rows (scores only). Each domain's source holds 4× its D0 share (every row of its table at
least once); D0 draws its share, and a growing domain takes source examples D0 does not hold
before it repeats any (data.upsample = fresh_first). Every training — every round and every
compare method — takes D0's number of optimizer steps (train.budget = d0_steps).
The starting mixture D0 is wrong in three known ways, and the reference set weights the five
capabilities equally:
  - cities, needed as much as the others, is starved (300 of 7,000 examples);
  - times is oversized (2,600): it is saturated long before that;
  - translate_wrong (600) is harmful: translate's very prompts with a conflicting table.
A good mixer moves volume from the saturated and harmful domains to the starved capability.
Rounds keep the total fixed (equal training tokens).

Other starting mixtures with other defects (same suite, same 7,000 examples), `d0=NAME`:
  facts_starved   facts starved (250), codes oversized (2,600), times 1,800, cities 650
  translate_harm  translate itself starved (300) and its harmful twin large (1,200)
e.g. `--config configs/demo.py:seeds=5,d0=facts_starved`.

Only what differs from configs/common.py's defaults is set here (mode ideal, packed batches, the
tiny model, 128-token rows, batches of 32 for the curvature and the influence are defaults).
"""

from configs import common
from ideal_jax.utils.errors import InputError

# D0 shares (the sources hold demo_pool_factor times as many).
STARTING_MIXTURES = {
    "default": dict(
        times=2600, facts=1300, translate=1100, codes=1100, cities=300, translate_wrong=600
    ),
    "facts_starved": dict(
        times=1800, facts=250, translate=1100, codes=2600, cities=650, translate_wrong=600
    ),
    "translate_harm": dict(
        times=2000, facts=1300, translate=300, codes=1100, cities=1100, translate_wrong=1200
    ),
}


def get_config(arg: str | None = None):
    items = [x for x in (arg or "").split(",") if x.strip()]
    chosen = [x.split("=", 1)[1].strip() for x in items if x.strip().startswith("d0=")]
    arg = ",".join(x for x in items if not x.strip().startswith("d0="))
    d0 = chosen[-1] if chosen else "default"
    if d0 not in STARTING_MIXTURES:
        raise InputError(
            f"unknown starting mixture {d0!r}; one of {', '.join(STARTING_MIXTURES)}", field="d0"
        )
    cfg = common.base_config()
    cfg.data.demo = True
    cfg.data.demo_train_sizes = dict(STARTING_MIXTURES[d0])
    cfg.data.demo_n_test = 40  # test rows of each 64-row table (disjoint from the dev rows)
    cfg.data.demo_n_ref = 24  # dev rows: the reference set
    cfg.data.demo_pool_factor = 4  # each source holds 4x its D0 share
    cfg.data.max_len = 96
    cfg.train.epochs = 6
    cfg.train.batch_size = 16
    cfg.train.learning_rate = 1e-2
    cfg.train.warmup_steps = 20
    cfg.train.log_every = 20
    cfg.eval.max_new_tokens = 12
    cfg.compare.k = 4
    common.apply_overrides(cfg, arg)
    return cfg.lock()
