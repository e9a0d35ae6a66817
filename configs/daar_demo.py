"""DaaR on the demo suite with its labels hidden: pseudo-domains, probes and a 20% selection.

    python -m ideal_jax.main --config configs/daar_demo.py --workdir runs/daar_demo

A randomly initialised tiny model cannot write instruction/response pairs, so the pairs behind the
domain centroids come from a small file of examples (generator="file", written by the demo suite
builder); with a real instruct model use generator="model". `:ideal=1` instead runs the IDEAL loop
on the unlabeled pool with DaaR's pseudo-domains as its domains.
"""

from configs import common, demo

DESCRIPTIONS = {
    "arithmetic": "Add or subtract two small integers and give the result.",
    "reverse": "Reverse the letters of a short lowercase word.",
    "sort": "Sort a list of digits in ascending order.",
    "lookup": "Look up the value of a key in a short key=value table.",
    "uppercase": "Write a short lowercase word in uppercase letters.",
}


def get_config(arg: str | None = None):
    ideal = arg is not None and "ideal=1" in arg
    cfg = demo.get_config()
    cfg.unlock()
    # The copy family of the demo suite (its capabilities are those of DESCRIPTIONS); the IDEAL
    # demo's table family keys its rows by one character, too little text to cluster on.
    cfg.data.demo_train_sizes = dict(
        arithmetic=400, reverse=2000, sort=1000, lookup=800, uppercase=1600, arithmetic_wrong=600
    )
    cfg.data.demo_n_test = 200
    cfg.data.demo_pool_factor = 1  # the pool is the labeled demo domains themselves
    cfg.mode = "ideal" if ideal else "daar"
    cfg.daar.domains = DESCRIPTIONS
    cfg.daar.generator = "file"
    cfg.daar.seed_pairs = "demo"  # resolved to WORKDIR/demo_data/seed_pairs.jsonl
    cfg.daar.feature_layer = 2
    cfg.daar.use_for_ideal = ideal
    rest = ",".join(a for a in (arg or "").split(",") if a and a != "ideal=1")
    common.apply_overrides(cfg, rest)
    return cfg.lock()
