"""Does α predict what retraining does? Predicted vs retrained change of the reference loss.

    PYTHONPATH=. python benchmarks/counterfactual.py [--scale 2] [--epochs 2] [--beta 0.3]
        [--noise_seeds 2] [--operators identity,kfac,ekfac]

On the demo suite (configs/tiny.py with its domain sizes × `scale`):
  1. train θ_0 on D_0 (β = 0) from the base model; Q_0 = reference loss ("all");
  2. compute α for every operator, in "paper" and "exact" scaling (METHOD §1.1) — the passes of
     stages.influence_round (same σ-subsample, batches and library calls; the slow test checks
     that the rows agree), run once and shared by all operators instead of once per operator;
  3. for each domain j retrain from the same base with β_j = `beta` (others 0, keep_total=False:
     a pure volume change) and the same seeds, and measure ΔQ_j = Q(β) − Q_0;
  4. compare ΔQ_j with the first-order prediction α_j · β_j across domains: Pearson, Spearman,
     sign agreement. "exact" scaling is the true derivative ∂Q/∂β_j; "paper" omits |D_j|/N (and
     the ∇L̄_tr term), so only its correlations, not its magnitudes, are comparable.
Noise floor: retrains at β = 0 with other data-order seeds (train.seed); their |ΔQ| is the change
that SGD noise alone produces. Note that any change of the mixture also reshuffles the data
order, so every ΔQ_j carries noise of that size.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from ideal_jax import sharding, stages  # noqa: E402
from ideal_jax.curvature import ekfac, operators  # noqa: E402
from ideal_jax.curvature import kfac as kfac_lib  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.data import batching  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.influence import alpha as alpha_lib  # noqa: E402
from ideal_jax.influence import gradients  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import decoding  # noqa: E402


def make_config(scale: int, epochs: int):
    """configs/tiny.py with `scale`× the domain volumes, `epochs` epochs, quiet."""
    from configs import tiny

    cfg = tiny.get_config()
    with cfg.unlocked():
        cfg.progress = False
        cfg.train.epochs = epochs
        cfg.train.checkpoint_every = 10_000  # only the final checkpoint: retrains are throwaway
        cfg.data.demo_train_sizes = {k: v * scale for k, v in cfg.data.demo_train_sizes.items()}
    return cfg


def alpha_rows(cfg, model_cfg, params, suite, mix, mesh, operator_names) -> dict:
    """{(operator, scaling): α row "all"}, mirroring ideal_jax.influence.stage (one layer group)
    but with one factor, correction and gradient pass shared by every operator and scaling."""
    curv = cfg.curvature
    pad_id = suite.tokenizer.pad_token_id or 0
    layers = layers_lib.select_layers(params, curv.layers)
    problem = kfac_lib.lm_problem(model_cfg, layers)
    items = influence_stage.sigma_subsample(suite, mix, curv.sigma, cfg.seed)
    rng = jax.random.key(cfg.seed)
    longest = max(len(t.input_ids) for t in items + suite.reference_tokenized)
    seq_len = max(longest, min(cfg.train.seq_len, decoding.bucket(longest)))

    def batches(examples, names, batch_size):
        for b in batching.iterate_batches(
            examples, batch_size, seq_len, "pad", cfg.seed, 0, domain_names=names, pad_id=pad_id
        ):
            yield sharding.shard_batch(b, mesh)

    def grouped(examples, names, batch_size):  # every batch from one group (domain/capability)
        for g, name in enumerate(names):
            yield from ((g, b) for b in batches([t for t in examples if t.domain == name], names,
                                                batch_size))  # fmt: skip

    train_batches = lambda: batches(items, suite.domain_names, curv.batch_size)
    curvature = kfac_lib.KfacCurvature(problem, mode=curv.estimator)
    state = kfac_lib.accumulate_factors(curvature, params, train_batches(), rng)
    unit = "example" if curv.correction == "per_example" else "batch"
    state = ekfac.fit_eigen_correction(
        curvature, state, params, train_batches(), jax.random.fold_in(rng, 1), unit=unit
    )
    domain_grads = gradients.single_group_mean_gradients(
        problem, params, grouped(items, suite.domain_names, curv.batch_size), suite.domain_names
    )
    ref = grouped(suite.reference_tokenized, suite.capabilities, cfg.influence.batch_size)
    ref_grads = gradients.single_group_mean_gradients(problem, params, ref, suite.capabilities)
    out = {}
    for name in operator_names:
        inverse = operators.build_operator(
            name,
            problem=problem,
            params=params,
            damping=curv.damping,
            relative_damping=curv.relative_damping,
            curvature=curvature,
            state=state,
        )
        for scaling in alpha_lib.SCALINGS:
            result = alpha_lib.compute_alpha(
                ref_grads,
                domain_grads,
                inverse,
                layers=layers,
                scaling=scaling,
                domain_sizes=[float(n) for n in mix.target_sizes],
                sigma=curv.sigma,
            )
            out[name, scaling] = result.row("all")
    return out


def compare(predicted_j: np.ndarray, actual_j: np.ndarray) -> dict:
    """Pearson, Spearman and sign agreement of predicted vs actual ΔQ across domains."""
    return {
        "pearson": float(stats.pearsonr(predicted_j, actual_j)[0]),
        "spearman": float(stats.spearmanr(predicted_j, actual_j)[0]),
        "sign_agreement": float(np.mean(np.sign(predicted_j) == np.sign(actual_j))),
    }


def run_counterfactual(
    cfg, workdir: str, *, beta: float = 0.3, noise_seeds: int = 1,
    operator_names=("identity", "kfac", "ekfac"), log=print,
) -> dict:  # fmt: skip
    """Steps 1–4 of the module docstring; returns the numbers (all JSON-ready)."""
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = stages.load_suite(cfg, workdir)
    model_cfg, base = stages.load_model(cfg, mesh, suite.tokenizer)
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    pad_id = suite.tokenizer.pad_token_id or 0

    def retrain(tag: str, beta_by_domain: dict, run_cfg=cfg):
        t0 = time.perf_counter()
        mix = mixture_lib.build_mixture(ids, beta_by_domain, seed=cfg.seed, keep_total=False)
        rdir = os.path.join(workdir, tag)
        params = stages.train_round(run_cfg, model_cfg, mesh, rdir, suite, mix, base)
        q = stages.reference_losses(
            model_cfg, params, suite, mesh, cfg.influence.batch_size, cfg.train.seq_len, pad_id
        )["all"]
        log(
            f"  {tag:<16} sizes {mix.target_sizes}  Q = {q:.5f}  ({time.perf_counter() - t0:.0f} s)"
        )
        return params, mix, q

    params0, mix0, q0 = retrain("base", {})
    t0 = time.perf_counter()
    alphas = alpha_rows(cfg, model_cfg, params0, suite, mix0, mesh, operator_names)
    log(f"  influence (all operators, both scalings) {time.perf_counter() - t0:.0f} s")
    actual = np.asarray(
        [retrain(f"plus_{name}", {name: beta})[2] - q0 for name in suite.domain_names]
    )
    noise = []
    for s in range(1, noise_seeds + 1):
        noisy_cfg = cfg.copy_and_resolve_references()
        with noisy_cfg.unlocked():
            noisy_cfg.train.seed = cfg.train.seed + s  # data order only: init is the base model
        noise.append(retrain(f"noise_seed{s}", {}, noisy_cfg)[2] - q0)
    table = {}
    for (op, scaling), alpha_j in alphas.items():
        predicted = np.asarray(alpha_j) * beta
        table[f"{op}/{scaling}"] = {**compare(predicted, actual), "predicted": predicted.tolist()}
    return {
        "domains": list(suite.domain_names),
        "domain_sizes": list(mix0.target_sizes),
        "beta": beta,
        "q0": q0,
        "actual": actual.tolist(),
        "noise": noise,
        "table": table,
        "alpha": {f"{op}/{sc}": np.asarray(a).tolist() for (op, sc), a in alphas.items()},
        "_state": (model_cfg, params0, suite, mix0, mesh),  # for the test's stage cross-check
    }


def print_report(res: dict) -> None:
    print(f"\nQ_0 = {res['q0']:.5f}; β = {res['beta']} on one domain at a time")
    print(
        f"{'domain':<12}{'|D_j|':>7}{'ΔQ actual':>12}" + "".join(f"{k:>17}" for k in res["table"])
    )
    for j, name in enumerate(res["domains"]):
        preds = "".join(f"{v['predicted'][j]:>17.5f}" for v in res["table"].values())
        print(f"{name:<12}{res['domain_sizes'][j]:>7}{res['actual'][j]:>12.5f}{preds}")
    floor = np.abs(res["noise"])
    print(f"noise floor (β = 0, other data order): ΔQ = {np.round(res['noise'], 5).tolist()}")
    print(f"mean |ΔQ_j| = {np.mean(np.abs(res['actual'])):.5f} vs noise {floor.mean():.5f}\n")
    print(f"{'operator/scaling':<18}{'pearson':>9}{'spearman':>10}{'sign agree':>12}")
    for key, row in res["table"].items():
        print(
            f"{key:<18}{row['pearson']:>9.3f}{row['spearman']:>10.3f}{row['sign_agreement']:>12.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, help="× configs/tiny.py domain sizes")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--beta", type=float, default=0.3)
    parser.add_argument("--noise_seeds", type=int, default=2)
    parser.add_argument("--operators", default="identity,kfac,ekfac")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: temporary)")
    args = parser.parse_args()
    cfg = make_config(args.scale, args.epochs)
    kwargs = dict(
        beta=args.beta, noise_seeds=args.noise_seeds, operator_names=args.operators.split(",")
    )
    if args.workdir:
        print_report(run_counterfactual(cfg, args.workdir, **kwargs))
        return
    with tempfile.TemporaryDirectory() as workdir:
        print_report(run_counterfactual(cfg, workdir, **kwargs))


if __name__ == "__main__":
    main()
