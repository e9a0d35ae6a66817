"""IDEAL on DaaR's pseudo-domains against IDEAL on the true domains, on one pool, over seeds.

    python benchmarks/daar_pseudo_vs_true.py --seeds 5 --workdir /tmp/daar_pseudo_vs_true
    python benchmarks/daar_pseudo_vs_true.py --quick          # smaller pool, fewer epochs

The pool is the copy-task demo pool of configs/daar_demo.py (arithmetic, reverse, sort, lookup,
uppercase and the harmful arithmetic_wrong; sizes scaled by --scale). For each seed s two IDEAL
runs (ideal_jax/ideal.py `run_ideal`) are made from the same config, which differ only in
cfg.daar.use_for_ideal:

  true    IDEAL's domains are the pool's true labels (6 domains)
  pseudo  the labels are hidden; DaaR (configs/daar_demo.py's cfg.daar) labels every pool
          example with one of its 5 pseudo-domains, and those are IDEAL's domains
          (ideal_jax/daar/job.py `pseudo_domain_examples`, as `configs/daar_demo.py:ideal=1`).
          As in that config, the centroid pairs are the first 30 training examples of each
          described capability (seed_pairs="demo": the demo's stand-in for the pairs an
          instruct model would write, so 150 labelled examples shape the centroids) and the
          probe set is the reference split with its labels hidden.

Both arms: seed s (data, initialisation, mixture resampling) and training seed s, the same pool
(checked: same ids and texts), the same base parameters (checked), the same rounds, schedule,
epochs and test split. D0 is the whole pool in both arms; with reweight.keep_total the total
number of examples of every later round is the pool's size (checked per round; the benchmark
stops if the arms differ). Tokens per round are measured from each round's mixture (all tokens
and response tokens) and reported: they can differ slightly once IDEAL reweights, because the
arms keep and duplicate different examples; they are not rescaled (equal examples is the
constraint IDEAL's keep_total enforces).

Reported: purity of the pool's pseudo-labels against the hidden labels (`demo_pools.purity`:
the share of examples whose pseudo-domain's majority true label is their own), also with
arithmetic_wrong merged into arithmetic (the same prompts; no description names it), and the
confusion pseudo-domain → true-label counts; per arm the final round's average exact match on the
test split and capability-mean reference loss, mean ± 95% t interval over seeds, the paired
difference pseudo − true with its interval (ideal_jax/stats.py), and each arm's D0 as the
baseline (D0 has the same examples in both arms, grouped into other domains, so the training
order can differ: its arm difference is training-order noise).
Every seed's result is cached under --workdir (a rerun resumes). A plot goes to
WORKDIR/pseudo_vs_true.png. The last line printed is one JSON object.

Sizes. The defaults are --scale 0.5 (a 3,200-example pool), --epochs 8, --rounds 2, 100 test
items per capability. Of the three settings measured for D0 (average exact match 0.045 at scale
0.25 / 3 epochs, 0.095 at 0.5 / 4, 0.40 at 0.5 / 8) only the last gets the tiny model off the
floor at which no mixture can make a difference. A seed (six SFT runs, two influence stages,
one DaaR run) took 200-440 s per arm, 570 s on average, on the shared 2-core CPU at load average
~10: 48 minutes for 5 seeds (2026-11-28); an idle machine needs much less. --quick (scale 0.25,
4 epochs, 1 round) is a smoke run, not evidence. --override key=value,... changes both arms'
config alike (the test uses it to shrink DaaR).

Measured (5 seeds, defaults, 2026-11-28): purity 0.937 ± 0.001 (1.000 with arithmetic_wrong
merged: DaaR puts it with arithmetic, one pseudo-domain for both); final average exact match true
0.333 ± 0.080, pseudo 0.346 ± 0.181, pseudo − true +0.013 ± 0.213 (not significant; D0 itself
spans 0.17-0.45 over seeds: the copy tasks' phase transitions dominate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common, daar_demo  # noqa: E402
from ideal_jax import ideal, stats  # noqa: E402
from ideal_jax.daar import centroids as cen  # noqa: E402
from ideal_jax.daar import demo_pools  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402

ARMS = ("true", "pseudo")
# The harmful domain repeats arithmetic's prompts with wrong answers: no description names it.
MERGE = {"arithmetic_wrong": "arithmetic"}


def make_config(args, seed: int, arm: str):
    """configs/daar_demo.py for one arm and seed; the arms differ only in daar.use_for_ideal."""
    cfg = daar_demo.get_config("ideal=1")
    cfg.unlock()
    cfg.daar.use_for_ideal = arm == "pseudo"
    cfg.seed, cfg.train.seed, cfg.daar.seed = seed, seed, seed
    cfg.progress = False
    cfg.rounds = args.rounds
    cfg.train.epochs = args.epochs
    cfg.data.demo_train_sizes = {
        cap: max(1, round(n * args.scale)) for cap, n in cfg.data.demo_train_sizes.items()
    }
    cfg.data.demo_n_test = args.n_test
    cfg.data.demo_n_ref = args.n_ref
    common.apply_overrides(cfg, args.override)  # the same for both arms
    return cfg.lock()


def agreement(true_by_id: dict[str, str], pseudo_by_id: dict[str, str]) -> dict:
    """Purity of the pseudo-labels against the true labels, and the confusion pseudo → true."""
    if set(true_by_id) != set(pseudo_by_id):
        raise ValueError("the arms' pools hold different examples")
    ids = sorted(true_by_id)
    true_names = sorted(set(true_by_id.values()))
    pseudo_names = sorted(set(pseudo_by_id.values()))
    merged_names = sorted({MERGE.get(t, t) for t in true_names})
    true_n = np.array([true_names.index(true_by_id[i]) for i in ids])
    merged_n = np.array([merged_names.index(MERGE.get(true_by_id[i], true_by_id[i])) for i in ids])
    pseudo_n = np.array([pseudo_names.index(pseudo_by_id[i]) for i in ids])
    confusion = {
        p: {t: int(np.sum((pseudo_n == a) & (true_n == b))) for b, t in enumerate(true_names)}
        for a, p in enumerate(pseudo_names)
    }
    return {
        "purity": demo_pools.purity(pseudo_n, true_n),
        "purity_merged": demo_pools.purity(pseudo_n, merged_n),
        "confusion": confusion,
        "n": len(ids),
    }


def labels_by_id(suite) -> dict[str, str]:
    return {ex.id: name for name, exs in suite.domains.items() for ex in exs}


def round_volumes(run, rounds: int) -> list[dict[str, int]]:
    """Per round: examples, tokens and response tokens of the mixture trained on."""
    out = []
    for k in range(rounds + 1):
        mix = mixture_lib.read_manifest(os.path.join(run.rdir(k), "mixture.json"))
        items = mixture_lib.materialize(mix, run.suite.tokenized, id_of=lambda t: t.example_id)
        out.append(
            {
                "examples": int(sum(mix.target_sizes)),
                "tokens": int(sum(len(t.input_ids) for t in items)),
                "response_tokens": int(sum(int(t.loss_mask.sum()) for t in items)),
                "volumes": dict(zip(mix.domain_names, map(int, mix.target_sizes))),
            }
        )
    return out


def _same_pool_and_init(runs) -> None:
    """Both arms read the same examples and start from the same parameters."""
    import jax

    texts = [
        {ex.id: cen.example_text(ex) for exs in r.suite.domains.values() for ex in exs}
        for r in runs.values()
    ]
    if texts[0] != texts[1]:
        raise RuntimeError("the arms' pools differ")
    leaves = [jax.tree_util.tree_leaves(r.base_params) for r in runs.values()]
    if not all(np.array_equal(a, b) for a, b in zip(*leaves)):
        raise RuntimeError("the arms' initial parameters differ")


def _losses(summary: dict, k: int) -> dict[str, float]:
    losses = {c: v for c, v in summary["reference_loss"][k].items() if c != "all"}
    losses["average"] = float(np.mean(list(losses.values())))
    return losses


def run_seed(args, seed: int) -> dict:
    sdir = os.path.join(args.workdir, f"seed_{seed}")
    done = os.path.join(sdir, "result.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    start = time.time()
    cfgs = {arm: make_config(args, seed, arm) for arm in ARMS}
    runs = {arm: ideal.load_run(cfgs[arm], os.path.join(sdir, arm)) for arm in ARMS}
    _same_pool_and_init(runs)
    out = {"seed": seed, "arms": {}}
    true_by_id, pseudo_by_id = (labels_by_id(runs[arm].suite) for arm in ARMS)
    out["agreement"] = agreement(true_by_id, pseudo_by_id)
    with open(os.path.join(sdir, "labels.json"), "w") as f:  # in the pool's order (DaaR's)
        ids = list(true_by_id)
        json.dump(
            {
                "ids": ids,
                **{a: [m[i] for i in ids] for a, m in zip(ARMS, (true_by_id, pseudo_by_id))},
            },
            f,
        )
    print(
        f"seed {seed}: {out['agreement']['n']} pool examples, pseudo-label purity "
        f"{out['agreement']['purity']:.3f} (arithmetic_wrong merged "
        f"{out['agreement']['purity_merged']:.3f}); domains true {runs['true'].suite.domain_names}"
        f", pseudo {runs['pseudo'].suite.domain_names}",
        flush=True,
    )
    for arm in ARMS:
        t0 = time.time()
        result = ideal.run_ideal(cfgs[arm], runs[arm].workdir, loaded=runs[arm])
        last = len(result["scores"]) - 1
        out["arms"][arm] = {
            "domains": list(runs[arm].suite.domain_names),
            "scores": result["scores"],
            "losses": [_losses(result, k) for k in range(last + 1)],
            "volumes": round_volumes(runs[arm], last),
            "alpha": [r.get("alpha") for r in result["rounds"]],
            "seconds": round(time.time() - t0, 1),
        }
        a = out["arms"][arm]
        print(
            f"seed {seed} {arm:>6}: D0 {a['scores'][0]['average']:.3f} → "
            f"D{last} {a['scores'][last]['average']:.3f} exact match, reference loss "
            f"{a['losses'][0]['average']:.3f} → {a['losses'][last]['average']:.3f}; "
            f"examples/tokens per round {[(v['examples'], v['tokens']) for v in a['volumes']]}; "
            f"final volumes {a['volumes'][last]['volumes']}; {a['seconds']:.0f} s",
            flush=True,
        )
    per_round = [[v["examples"] for v in out["arms"][arm]["volumes"]] for arm in ARMS]
    if per_round[0] != per_round[1]:
        raise RuntimeError(f"unequal training examples per round: {dict(zip(ARMS, per_round))}")
    out["seconds"] = round(time.time() - start, 1)
    with open(done, "w") as f:
        json.dump(out, f, indent=1)
    return out


def _ci(values) -> dict:
    s = stats.mean_ci(values)
    return {"mean": s["mean"], "ci95": s["ci95"], "n": s["n"], "values": list(values)}


def _paired(a, b) -> dict:
    d = stats.paired(a, b)
    return {k: d[k] for k in ("mean", "ci95", "significant", "per_seed")}


def aggregate(runs: list[dict]) -> dict:
    last = len(runs[0]["arms"]["true"]["scores"]) - 1
    get = lambda arm, key, k, metric="average": [r["arms"][arm][key][k][metric] for r in runs]
    out = {
        "seeds": len(runs),
        "rounds": last,
        "purity": {
            **_ci([r["agreement"]["purity"] for r in runs]),
            "merged_arithmetic_wrong": _ci([r["agreement"]["purity_merged"] for r in runs]),
            "confusion_seed0": runs[0]["agreement"]["confusion"],
        },
    }
    for arm in ARMS:
        out[arm] = {
            **_ci(get(arm, "scores", last)),
            "reference_loss": _ci(get(arm, "losses", last)),
            "d0": _ci(get(arm, "scores", 0)),
            "d0_reference_loss": _ci(get(arm, "losses", 0)),
            "vs_d0": _paired(get(arm, "scores", last), get(arm, "scores", 0)),
            "reference_loss_vs_d0": _paired(get(arm, "losses", last), get(arm, "losses", 0)),
            "per_capability": {
                cap: stats.mean_ci(get(arm, "scores", last, cap))["mean"]
                for cap in runs[0]["arms"][arm]["scores"][last]
            },
        }
    out["pseudo_minus_true"] = {
        **_paired(get("pseudo", "scores", last), get("true", "scores", last)),
        "reference_loss": _paired(get("pseudo", "losses", last), get("true", "losses", last)),
        "d0": _paired(get("pseudo", "scores", 0), get("true", "scores", 0)),
    }
    vol = {arm: [r["arms"][arm]["volumes"] for r in runs] for arm in ARMS}
    out["tokens_per_round"] = {
        arm: [
            {
                key: float(np.mean([v[k][key] for v in vol[arm]]))
                for key in ("examples", "tokens", "response_tokens")
            }
            for k in range(last + 1)
        ]
        for arm in ARMS
    }
    out["seconds_per_seed"] = float(np.mean([r["seconds"] for r in runs]))
    return out


def print_table(agg: dict, args) -> None:
    fmt = lambda s: f"{s['mean']:.3f} ± {s['ci95'] or 0:.3f}"
    fmtd = lambda s: f"{s['mean']:+.3f} ± {s['ci95'] or 0:.3f}{' *' if s['significant'] else ''}"
    p = agg["purity"]
    print(
        f"\n{agg['seeds']} seeds, pool scale {args.scale}, {args.epochs} epochs, {agg['rounds']} "
        "rounds; mean ± 95% t interval over seeds, * = paired interval excludes 0"
    )
    print(
        f"pseudo-label purity {fmt(p)} (arithmetic_wrong merged into arithmetic: "
        f"{fmt(p['merged_arithmetic_wrong'])})"
    )
    print("confusion (seed 0), pseudo-domain → true-label counts:")
    for pseudo, row in p["confusion_seed0"].items():
        print(f"  {pseudo:>12}: " + ", ".join(f"{t} {c}" for t, c in row.items() if c))
    print(f"\n{'':<22} {'true domains':>18} {'pseudo-domains':>18} {'pseudo − true':>20}")
    rows = [
        ("D0 exact match", "d0", agg["pseudo_minus_true"]["d0"]),
        (f"D{agg['rounds']} exact match", None, agg["pseudo_minus_true"]),
        (f"D{agg['rounds']} reference loss", "reference_loss", None),
    ]
    for name, key, diff in rows:
        cells = [fmt(agg[arm][key] if key else agg[arm]) for arm in ARMS]
        if key == "reference_loss":
            diff = agg["pseudo_minus_true"]["reference_loss"]
        print(f"{name:<22} {cells[0]:>18} {cells[1]:>18} {fmtd(diff):>20}")
    for arm in ARMS:
        print(
            f"{arm:>6} D{agg['rounds']} − D0: exact match {fmtd(agg[arm]['vs_d0'])}, reference "
            f"loss {fmtd(agg[arm]['reference_loss_vs_d0'])}"
        )
    for arm in ARMS:
        print(
            f"{arm:>6} examples / tokens / response tokens per round: "
            + "; ".join(
                f"{v['examples']:.0f} / {v['tokens']:.0f} / {v['response_tokens']:.0f}"
                for v in agg["tokens_per_round"][arm]
            )
        )
    print(f"{agg['seconds_per_seed']:.0f} s per seed")


def plot(agg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in (
        (axes[0], None, "exact match (test split)"),
        (axes[1], "reference_loss", "reference loss"),
    ):
        for i, arm in enumerate(ARMS):
            final = agg[arm][key] if key else agg[arm]
            d0 = agg[arm]["d0_reference_loss" if key else "d0"]
            for j, (s, label) in enumerate(((d0, "D0"), (final, f"D{agg['rounds']}"))):
                x = i + 0.15 * (2 * j - 1)
                ax.scatter([x] * len(s["values"]), s["values"], s=12, alpha=0.6)
                ax.errorbar(x, s["mean"], yerr=s["ci95"] or 0, fmt="o", color="k", capsize=3)
                ax.annotate(label, (x, s["mean"]), xytext=(4, 0), textcoords="offset points")
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(title)
    conf = agg["purity"]["confusion_seed0"]
    pseudo = list(conf)
    true = list(conf[pseudo[0]])
    m = np.array([[conf[p][t] for t in true] for p in pseudo])
    axes[2].imshow(m, cmap="Blues")
    for (a, b), c in np.ndenumerate(m):
        axes[2].text(b, a, str(c), ha="center", va="center", fontsize=7)
    axes[2].set_xticks(range(len(true)), true, rotation=30, fontsize=7)
    axes[2].set_yticks(range(len(pseudo)), pseudo, fontsize=7)
    axes[2].set_title(f"seed 0: pseudo → true (purity {agg['purity']['values'][0]:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/daar_pseudo_vs_true")
    parser.add_argument("--scale", type=float, default=0.5, help="× daar_demo's pool sizes")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--n-test", type=int, default=100, help="test items per capability")
    parser.add_argument(
        "--n-ref", type=int, default=40, help="reference (= DaaR probe) items per capability"
    )
    parser.add_argument(
        "--override", default="", help="config overrides for both arms: key=value,key=value"
    )
    parser.add_argument("--quick", action="store_true", help="--scale 0.25 --epochs 4 --rounds 1")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.scale, args.epochs, args.rounds = 0.25, 4, 1
    os.makedirs(args.workdir, exist_ok=True)
    runs = [run_seed(args, seed) for seed in range(args.seeds)]
    agg = aggregate(runs)
    print_table(agg, args)
    agg["settings"] = {k: v for k, v in vars(args).items() if k not in ("workdir", "no_plot")}
    with open(os.path.join(args.workdir, "result.json"), "w") as f:
        json.dump(agg, f, indent=1)
    if not args.no_plot:
        plot(agg, os.path.join(args.workdir, "pseudo_vs_true.png"))
    print(json.dumps(agg))
    return agg


if __name__ == "__main__":
    main()
