"""Does α predict what retraining does? Predicted vs retrained change of the reference loss, ±δ.

    PYTHONPATH=. python benchmarks/counterfactual.py [--scale 2] [--epochs 40] [--lr 5e-3]
        [--weight_decay 0.1] [--delta 0.5] [--order_seeds 3] [--init_seeds 1]
        [--operators identity,kfac,ekfac,exact_block] [--workdir DIR]

On the demo suite (configs/tiny.py's domains × `scale`, plus the harmful domain arithmetic_wrong
unless --no_harmful; 32 reference items per capability), trained to near convergence: 40 epochs,
cosine from 5e-3 to 5e-4, AdamW weight decay 0.1 (a regularised objective has a better-defined
optimum; it did not lower the noise floor: std of Q over order seeds 0.21 with it at 40 epochs,
0.25 without at 32). The report prints the base run's last-epoch change of the training loss. The
default run (18 trainings of 20–60 s, influence passes of 2.5–5 min, most of it exact_block's CG)
took 9.5 min on 2 CPU cores shared with other jobs, 18 min when they were busier:
  1. train θ_0 on D_0 (β = 0) from the base model; Q_0 = the reference loss α's "all" row is the
     derivative of (cfg.influence.reference_weighting: "capability" = the mean over capabilities
     of each capability's mean token loss; "token" = the token-weighted mean);
  2. α for every operator in "paper" and "exact" scaling (METHOD §1.1), mirroring
     ideal_jax.influence.stage (same subsample; its batches: examples in order of length, each
     batch as long as its longest example, the loss at the response positions only; |D_j| in
     response tokens; the same library calls — the slow test checks that ekfac/paper is the
     stage's α), with one factor, correction and gradient pass shared by every operator.
     exact_block is the exact GGN of each selected layer with the cross-layer blocks dropped
     (what K-FAC approximates), inverted per layer by conjugate gradients on the library's exact
     curvature products, preconditioned by EK-FAC's inverse, at most 100 iterations: the dense
     [P, P] matrix of a tiny-model MLP layer (P = 12 288, × 6 layers) is too slow to build on a
     CPU. The solves stop at relative residuals of ~0.07–0.17 (each one's is in the JSON). On one
     layer (with the stage's earlier batching) g·x was then within 0.5 % of its value at residual
     2e-4 (300 plain CG iterations; plain CG was at residual 0.19 after 100). Its relative damping
     uses a Hutchinson estimate of the block's mean eigenvalue (8 probes) where the dense operator
     uses the exact diagonal, and it gives the "all" row only (a CG solve per row and layer);
  3. for each domain j retrain from the same base model with the same train seed at β_j = +δ and
     at β_j = −δ (others 0, keep_total=False: a pure volume change) and measure
     ΔQ_j^± = Q(±δ e_j) − Q_0;
  4. compare the measured changes with the first-order prediction α_j^exact · (±δ) across
     domains: Pearson, Spearman (with their p-values) and sign agreement (with its one-sided
     binomial p-value against a coin), for +δ, −δ and the symmetric difference
     S_j = (ΔQ_j^+ − ΔQ_j^−)/2 against α_j δ. S_j cancels the second-order term and Q_0 (and with
     it the base run's own SGD noise); "exact" scaling is the true derivative ∂Q/∂β_j, so its
     magnitudes are comparable too (the slope of measured on predicted is printed); "paper" omits
     |D_j|/N and the ∇L̄_tr term, so only its correlations are. The per-capability rows of α give a
     second comparison with more points: every (capability, domain) pair of S against α δ.

Noise floor, all at β = 0:
  (a) same-seed rerun (same init, same data order): tests determinism — 0 exactly on one CPU;
  (b) other seeds (init *and* data order: the base model drawn from seed + s, train.seed + s):
      the spread of Q over what a user would call "another run";
  (c) reshuffle only (same init, train.seed + s): the init and the data order are separate seeds
      here (cfg.seed draws the base model, train.seed the order), so this is measurable. A change
      of the mixture reshuffles the whole order (the permutation is of a list of another length),
      so every ΔQ_j^± carries noise of this size: with σ the std of Q over order seeds, ΔQ_j^± has
      noise ≈ √2 σ and S_j has ≈ σ/√2. A domain is "above noise" when |S_j| > 2 σ/√2.
The last line of stdout is one JSON object with every figure.

What it showed (the default run; and the same benchmark at 32 epochs without weight decay): the
retrained ΔQ are noise. Same-seed reruns are bit-identical, but another data order alone moves Q
by σ ≈ 0.2 (σ_order 0.21 / 0.25, Q_0 1.38 / 1.08), more than a ±50 % volume change of any one
domain does: no domain's |S| exceeded 2 × its noise (largest 1.7 / 1.6 ×), and no operator's
Pearson, Spearman or sign agreement was significant (every p > 0.2; n = 6 domains, 30
capability × domain pairs). Spearman of S against αδ ("exact"): identity −0.49 / −0.14, kfac
−0.49 / +0.09, ekfac −0.49 / −0.09, exact_block +0.37 / +0.09. The demo's capabilities flip
between "learned" and not from run to run (reverse's reference loss 0.2–1.5, uppercase's
1.3–3.1 across order seeds): that is what a volume change competes with.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
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

from ideal_jax import sharding  # noqa: E402
from ideal_jax.curvature import ekfac, operators  # noqa: E402
from ideal_jax.curvature import kfac as kfac_lib  # noqa: E402
from ideal_jax.curvature import layers as layers_lib  # noqa: E402
from ideal_jax.curvature import problem as problem_lib  # noqa: E402
from ideal_jax.data import batching  # noqa: E402
from ideal_jax.data import mixture as mixture_lib  # noqa: E402
from ideal_jax.data import suite as suite_lib  # noqa: E402
from ideal_jax.evaluate import stage as evaluate_stage  # noqa: E402
from ideal_jax.influence import alpha as alpha_lib  # noqa: E402
from ideal_jax.influence import gradients  # noqa: E402
from ideal_jax.influence import stage as influence_stage  # noqa: E402
from ideal_jax.model import loading  # noqa: E402
from ideal_jax.train import stage as train_stage  # noqa: E402

OPERATORS = ("identity", "kfac", "ekfac", "exact_block")
SIDES = ("plus", "minus", "symmetric")


def make_config(
    scale: int = 2,
    epochs: int = 40,
    learning_rate: float = 5e-3,
    *,
    weight_decay: float = 0.1,
    n_ref: int = 32,
    harmful: bool = True,
):
    """configs/tiny.py with `scale`× its domain volumes (+ arithmetic_wrong, as large as
    arithmetic, when `harmful`), `n_ref` reference items per capability, `epochs` epochs at peak
    learning rate `learning_rate` (cosine to 0.1×) with AdamW `weight_decay`, quiet."""
    from configs import tiny

    cfg = tiny.get_config()
    sizes = {k: v * scale for k, v in cfg.data.demo_train_sizes.items()}
    if harmful:
        sizes["arithmetic_wrong"] = sizes["arithmetic"]
    with cfg.unlocked():
        cfg.progress = False
        cfg.train.epochs = epochs
        cfg.train.learning_rate = learning_rate
        cfg.train.weight_decay = weight_decay
        cfg.train.checkpoint_every = 1_000_000  # only the final checkpoint: retrains are throwaway
        cfg.data.demo_train_sizes = sizes
        cfg.data.demo_n_ref = n_ref
    return cfg


def reference_objective(losses: dict, capabilities, weighting: str) -> float:
    """Q: the reference loss whose derivative is α's "all" row (influence/alpha.py)."""
    if weighting == "capability":
        return float(np.mean([losses[c] for c in capabilities]))
    return float(losses["all"])


def epoch_losses(train_dir: str) -> list[float]:
    """Mean logged training loss of each epoch (train/metrics.jsonl)."""
    per_epoch = collections.defaultdict(list)
    with open(os.path.join(train_dir, "metrics.jsonl")) as f:
        for line in f:
            entry = json.loads(line)
            if "loss" in entry and "epoch" in entry:
                per_epoch[int(entry["epoch"])].append(float(entry["loss"]))
    return [float(np.mean(per_epoch[e])) for e in sorted(per_epoch)]


def response_tokens(suite, mix) -> list[float]:
    """|D_j| in the unit of the loss: response tokens of domain j in the mixture (as the stage)."""
    out = []
    for name, ids in zip(mix.domain_names, mix.example_ids):
        counts = {t.example_id: int(np.sum(t.loss_mask)) for t in suite.tokenized[name]}
        out.append(float(sum(counts[i] for i in ids)))
    return out


def preconditioned_cg(matvec, b, lam_p, precondition=None, *, tol=1e-4, max_iters=100):
    """Solves (H + diag λ) x = b (flat vectors) by conjugate gradients, preconditioned by
    `precondition` (an approximation of (H + λ)⁻¹, flat → flat; None: plain CG).
    Returns (x, relative residual ‖(H + λ) x − b‖ / ‖b‖ as tracked, iterations)."""
    jnp = jax.numpy
    op = lambda x: matvec(x) + lam_p * x
    apply_m = precondition or (lambda r: r)
    norm_b = float(jnp.linalg.norm(b))
    if norm_b == 0:
        return jnp.zeros_like(b), 0.0, 0
    x, r = jnp.zeros_like(b), b
    z = apply_m(r)
    d, rz = z, jnp.vdot(r, z)
    for it in range(max_iters):
        if float(jnp.linalg.norm(r)) <= tol * norm_b:
            return x, float(jnp.linalg.norm(r)) / norm_b, it
        hd = op(d)
        step = rz / jnp.vdot(d, hd)
        x, r = x + step * d, r - step * hd
        z = apply_m(r)
        rz_new = jnp.vdot(r, z)
        d, rz = z + (rz_new / rz) * d, rz_new
    return x, float(jnp.linalg.norm(r)) / norm_b, max_iters


def exact_block_operator(
    model_cfg,
    params,
    layers,
    batches,
    curv,
    rng,
    *,
    preconditioner=None,
    cg_tol=1e-4,
    cg_max_iters=100,
    info=None,
):
    """(H_bb + λ_b)⁻¹ per selected layer b, H = the exact GGN of the training loss on `batches`
    with its cross-layer blocks dropped (what the dense exact_block operator inverts): for each
    layer, the library's exact curvature products (curvature/exact.py make_matvec on a one-layer
    problem) and conjugate gradients, preconditioned by `preconditioner` (an InverseOperator over
    the same layers, e.g. EK-FAC's: it is block-diagonal too, so its block b is applied alone;
    None: plain CG). λ_b = damping × a Hutchinson estimate of the block's mean eigenvalue (relative
    damping; the dense operator uses the exact diagonal), as the library's "cg" operator does.
    `info` (a dict) receives each solve's relative residual ‖(H_bb + λ_b) x − v‖ / ‖v‖ and its
    number of iterations."""
    from jax.flatten_util import ravel_pytree

    from ideal_jax.curvature import exact as exact_lib

    per_layer = {}
    zeros = jax.tree.map(jax.numpy.zeros_like, layers_lib.split_params(params, layers)[0])
    for i, path in enumerate(layers):
        problem = problem_lib.lm_problem(model_cfg, (path,))
        selected, _ = layers_lib.split_params(params, (path,))
        matvec = exact_lib.make_matvec(problem, "ggn", params, batches)
        if curv.relative_damping:
            means = exact_lib.hutchinson_block_means(matvec, selected, jax.random.fold_in(rng, i))
            lam = curv.damping * means[path]
        else:
            lam = jax.numpy.asarray(curv.damping, jax.numpy.float32)
        lam_p = exact_lib.damping_vector(exact_lib.layer_slices(selected), {path: lam})
        _, unravel = ravel_pytree(selected)
        flat_matvec = lambda x, mv=matvec, un=unravel: ravel_pytree(mv(un(x)))[0]
        precondition = None
        if preconditioner is not None:

            def precondition(r, path=path, un=unravel):
                full = preconditioner({**zeros, path: un(r)[path]})
                return ravel_pytree({path: full[path]})[0]

        per_layer[path] = (flat_matvec, lam, lam_p, unravel, precondition)

    def apply(vector: dict) -> dict:
        out = {}
        for path, v in vector.items():
            flat_matvec, _, lam_p, unravel, precondition = per_layer[path]
            x, residual, iters = preconditioned_cg(
                flat_matvec,
                ravel_pytree({path: v})[0],
                lam_p,
                precondition,
                tol=cg_tol,
                max_iters=cg_max_iters,
            )
            if info is not None:
                info.setdefault("relative_residual", {}).setdefault(path, []).append(residual)
                info.setdefault("iterations", {}).setdefault(path, []).append(iters)
            out[path] = unravel(x)[path]
        return out

    damping = {p: entry[1] for p, entry in per_layer.items()}
    return operators.InverseOperator("exact_block", damping, apply)


def alpha_matrices(cfg, model_cfg, params, suite, mix, mesh, operator_names, *, log=print) -> dict:
    """{"rows", "domains", "alpha": {"op/scaling": {"rows", "matrix" [rows × domains]}},
    "seconds": {op: s}, "info": {op: diagnostics}} (exact_block: the "all" row only),
    mirroring ideal_jax.influence.stage (one layer group) but with one factor, correction and
    gradient pass shared by every operator and scaling."""
    curv, infl = cfg.curvature, cfg.influence
    weighting = infl.get("reference_weighting", "capability")
    pad_id = suite.tokenizer.pad_token_id or 0
    layers = layers_lib.select_layers(params, curv.layers)
    problem = problem_lib.lm_problem(model_cfg, layers)
    items, _ = influence_stage.subsample(suite, mix, curv, cfg.seed)
    rng = jax.random.key(cfg.seed)

    def batches(examples, names, batch_size, *, k=None):
        # as the stage: one example per row, examples in order of length, each batch as long as
        # its longest example, the loss at K response positions per row (problem.add_loss_positions)
        plans = influence_stage.row_plan(examples, batch_size, cfg.train.seq_len, k)
        for chunk, length, k_rows in plans:
            for b in batching.iterate_batches(
                chunk, batch_size, length, "pad", cfg.seed, 0, domain_names=names, pad_id=pad_id
            ):
                yield sharding.shard_batch(problem_lib.add_loss_positions(b, k_rows), mesh)

    def grouped(examples, names, batch_size):  # every batch from one group (one K for all)
        k = influence_stage.loss_rows_per_example(examples)
        for g, name in enumerate(names):
            yield from ((g, b) for b in batches([t for t in examples if t.domain == name], names,
                                                batch_size, k=k))  # fmt: skip

    train_batches = lambda: batches(items, suite.domain_names, curv.batch_size)
    seconds = {}
    t0 = time.perf_counter()
    domain_grads = gradients.single_group_mean_gradients(
        problem, params, grouped(items, suite.domain_names, curv.batch_size), suite.domain_names
    )
    ref = grouped(suite.reference_tokenized, suite.capabilities, infl.batch_size)
    ref_grads = gradients.single_group_mean_gradients(problem, params, ref, suite.capabilities)
    rows = alpha_lib.reference_rows(ref_grads, weighting)
    seconds["gradients"] = time.perf_counter() - t0
    curvature = state = None
    if {"kfac", "ekfac", "exact_block"} & set(operator_names):
        t0 = time.perf_counter()
        curvature = kfac_lib.curvature_for(problem, curv.estimator)
        state = kfac_lib.accumulate_factors(curvature, params, train_batches(), rng)
        if {"ekfac", "exact_block"} & set(operator_names):
            unit = "example" if curv.correction == "per_example" else "batch"
            state = ekfac.fit_eigen_correction(
                curvature, state, params, train_batches(), jax.random.fold_in(rng, 1), unit=unit
            )
        seconds["factors"] = time.perf_counter() - t0
    tokens_j = response_tokens(suite, mix)
    out, info = {}, {}
    for name in operator_names:
        t0 = time.perf_counter()
        reference, vectors = ref_grads, None
        if name == "exact_block":
            # preconditioned by EK-FAC's inverse (a good approximation of the same blocks)
            ekfac_inverse = operators.build_operator(
                "ekfac", problem=problem, params=params, damping=curv.damping,
                relative_damping=curv.relative_damping, curvature=curvature, state=state,
            )  # fmt: skip
            inverse = exact_block_operator(
                model_cfg, params, layers, list(train_batches()), curv,
                jax.random.fold_in(rng, 2), preconditioner=ekfac_inverse,
                info=info.setdefault(name, {}),
            )  # fmt: skip
            # CG costs a pass over the subsample per iteration: the "all" row only
            g_all = rows[0][1]
            reference = gradients.GroupGradients(
                names=("all",),
                grads=jax.tree.map(lambda x: x[None], g_all),
                weights=np.asarray([ref_grads.overall_weight]),
                overall=g_all,
                overall_weight=ref_grads.overall_weight,
            )
        else:
            inverse = operators.build_operator(
                name,
                problem=problem,
                params=params,
                damping=curv.damping,
                relative_damping=curv.relative_damping,
                curvature=curvature,
                state=state,
                batches=train_batches,
                rng=jax.random.fold_in(rng, 2),
            )
        op_rows = alpha_lib.reference_rows(reference, weighting)
        vectors = inverse.many([g for _, g in op_rows])  # one product per row, both scalings
        for scaling in alpha_lib.SCALINGS:
            result = alpha_lib.compute_alpha(
                reference,
                domain_grads,
                inverse,
                layers=layers,
                scaling=scaling,
                domain_sizes=tokens_j,
                sigma=curv.sigma,
                reference_weighting=weighting,
                inverse_vectors=vectors,
            )
            out[f"{name}/{scaling}"] = {
                "rows": list(result.rows),
                "matrix": np.asarray(result.matrix),
            }
        seconds[name] = time.perf_counter() - t0
        log(f"  α with {name:<12} {seconds[name]:.0f} s")
    return {
        "rows": [n for n, _ in rows],
        "domains": list(suite.domain_names),
        "alpha": out,
        "seconds": seconds,
        "info": info,
    }


def _clean(x):
    return None if x is None or not math.isfinite(x) else float(x)


def compare(predicted, measured) -> dict:
    """Pearson and Spearman (with two-sided p-values) and sign agreement (with the one-sided
    binomial p-value of at least that many agreements under coin flips) of predicted vs measured.
    Correlations are None when either side is constant or n < 3 (undefined / meaningless)."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    n = len(predicted)
    agree = int(np.sum(np.sign(predicted) == np.sign(measured)))
    out = {
        "n": n,
        "sign_agreement": agree / n if n else None,
        "sign_p": float(stats.binomtest(agree, n, 0.5, alternative="greater").pvalue)
        if n
        else None,
    }
    defined = n >= 3 and np.ptp(predicted) > 0 and np.ptp(measured) > 0
    for key, fn in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        r, p = fn(predicted, measured) if defined else (None, None)
        out[key], out[f"{key}_p"] = _clean(r), _clean(p)
    return out


def slope(predicted, measured) -> float | None:
    """Least-squares slope through the origin of measured on predicted (1 = calibrated)."""
    predicted, measured = np.asarray(predicted, float), np.asarray(measured, float)
    denom = float(predicted @ predicted)
    return _clean(float(predicted @ measured) / denom) if denom > 0 else None


def noise_floor(q0: float, rerun: float | None, order: list[float], seeds: list[float]) -> dict:
    """The β = 0 reruns as changes of Q: (a) same seed, (b) other init + order, (c) order only.
    σ = std of Q over the base run and the order-seed runs (ddof = 1); the noise of one
    ΔQ_j^± ≈ √2 σ, of a symmetric difference ≈ σ/√2."""
    order_q = [q0, *order]
    sigma = float(np.std(order_q, ddof=1)) if len(order_q) >= 2 else None
    seeds_q = [q0, *seeds]
    return {
        "same_seed_delta": None if rerun is None else float(rerun - q0),
        "order_deltas": [float(q - q0) for q in order],
        "seed_deltas": [float(q - q0) for q in seeds],
        "sigma_order": sigma,
        "sigma_seed": float(np.std(seeds_q, ddof=1)) if len(seeds_q) >= 2 else None,
        "noise_one_sided": None if sigma is None else math.sqrt(2) * sigma,
        "noise_symmetric": None if sigma is None else sigma / math.sqrt(2),
    }


def analyse(
    *,
    delta: float,
    domains,
    capabilities,
    q0: float,
    q0_caps: dict,
    plus: list[dict],
    minus: list[dict],
    alpha: dict,
    noise: dict,
) -> dict:
    """The figures of the report from the runs: plus[j] / minus[j] = {"q", "caps"} of the run at
    β_j = +δ / −δ; alpha = {"op/scaling": {"rows": [...], "matrix": [rows × domains]}}. The
    capability × domain comparison needs every capability's row (None without them)."""
    measured = {
        "plus": np.asarray([r["q"] - q0 for r in plus]),
        "minus": np.asarray([r["q"] - q0 for r in minus]),
    }
    measured["symmetric"] = (measured["plus"] - measured["minus"]) / 2
    # per (capability, domain): the symmetric difference of each capability's loss
    caps_sym = np.asarray(
        [[(p["caps"][c] - m["caps"][c]) / 2 for p, m in zip(plus, minus)] for c in capabilities]
    )
    table, predictions = {}, {}
    for key, entry in alpha.items():
        rows, matrix = list(entry["rows"]), np.asarray(entry["matrix"])
        a_all = matrix[rows.index("all")]
        pred = {"plus": a_all * delta, "minus": -a_all * delta, "symmetric": a_all * delta}
        predictions[key] = pred["symmetric"].tolist()
        table[key] = {side: compare(pred[side], measured[side]) for side in SIDES}
        table[key]["slope_symmetric"] = slope(pred["symmetric"], measured["symmetric"])
        table[key]["capability_x_domain"] = None
        if all(c in rows for c in capabilities):
            per_cap = matrix[[rows.index(c) for c in capabilities]] * delta
            table[key]["capability_x_domain"] = compare(per_cap.ravel(), caps_sym.ravel())
    sigma_sym = noise.get("noise_symmetric")
    sigma_one = noise.get("noise_one_sided")
    above = {}
    for j, name in enumerate(domains):
        above[name] = {
            "z_symmetric": _clean(abs(measured["symmetric"][j]) / sigma_sym) if sigma_sym else None,
            "z_plus": _clean(abs(measured["plus"][j]) / sigma_one) if sigma_one else None,
            "z_minus": _clean(abs(measured["minus"][j]) / sigma_one) if sigma_one else None,
        }
        above[name]["above_noise"] = bool(sigma_sym and above[name]["z_symmetric"] > 2)
    return {
        "delta": delta,
        "domains": list(domains),
        "q0": q0,
        "q0_capabilities": dict(q0_caps),
        "measured": {k: v.tolist() for k, v in measured.items()},
        "measured_capability_symmetric": caps_sym.tolist(),
        "predicted_symmetric": predictions,
        "table": table,
        "noise": noise,
        "above_noise": above,
    }


def run_counterfactual(
    cfg,
    workdir: str,
    *,
    delta: float = 0.5,
    order_seeds: int = 3,
    init_seeds: int = 1,
    rerun: bool = True,
    operator_names=OPERATORS,
    log=print,
) -> dict:
    """Steps 1–4 and the noise floor of the module docstring; the numbers, JSON-ready."""
    t_start = time.perf_counter()
    mesh = sharding.make_mesh(dict(cfg.mesh))
    suite = suite_lib.load_suite(cfg, workdir)
    model_cfg, base = loading.load_model(cfg.model, mesh, suite.tokenizer, seed=cfg.seed)
    ids = {name: [t.example_id for t in items] for name, items in suite.tokenized.items()}
    pad_id = suite.tokenizer.pad_token_id or 0
    weighting = cfg.influence.get("reference_weighting", "capability")
    runs = {}

    def retrain(tag: str, beta_by_domain: dict, *, init=base, seed_offset: int = 0) -> dict:
        t0 = time.perf_counter()
        run_cfg = cfg.copy_and_resolve_references()
        with run_cfg.unlocked():
            run_cfg.train.seed = cfg.train.seed + seed_offset  # the data order only
        mix = mixture_lib.build_mixture(ids, beta_by_domain, seed=cfg.seed, keep_total=False)
        rdir = os.path.join(workdir, tag)
        params = train_stage.train_round(
            run_cfg.train, run_cfg.data, model_cfg, mesh, rdir, suite, mix, init
        )
        curve = epoch_losses(os.path.join(rdir, "train"))
        losses = evaluate_stage.reference_losses(
            model_cfg, params, suite, mesh, cfg.influence.batch_size, cfg.train.seq_len, pad_id
        )
        run = {
            "beta": dict(beta_by_domain),
            "sizes": list(mix.target_sizes),
            "train_seed": int(run_cfg.train.seed),
            "q": reference_objective(losses, suite.capabilities, weighting),
            "caps": {c: float(losses[c]) for c in suite.capabilities},
            "final_train_loss": curve[-1],
            "last_epoch_relative_change": (curve[-1] / curve[-2] - 1) if len(curve) > 1 else None,
            "seconds": time.perf_counter() - t0,
        }
        runs[tag] = run
        log(
            f"  {tag:<26} sizes {run['sizes']}  Q = {run['q']:.5f}  "
            f"(train loss {curve[-1]:.4f}, {run['seconds']:.0f} s)"
        )
        return {**run, "params": params, "mix": mix, "epoch_losses": curve}

    base_run = retrain("base", {})
    params0, mix0, q0 = base_run["params"], base_run["mix"], base_run["q"]
    t0 = time.perf_counter()
    alphas = alpha_matrices(cfg, model_cfg, params0, suite, mix0, mesh, operator_names, log=log)
    log(f"  influence (all operators, both scalings) {time.perf_counter() - t0:.0f} s")
    plus = [retrain(f"plus_{name}", {name: delta}) for name in suite.domain_names]
    minus = [retrain(f"minus_{name}", {name: -delta}) for name in suite.domain_names]
    rerun_q, rerun_params_diff = None, None
    if rerun:
        again = retrain("rerun_same_seed", {})
        rerun_q = again["q"]
        rerun_params_diff = float(
            max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(again["params"]))
            )
        )
    order = [retrain(f"order_seed+{s}", {}, seed_offset=s)["q"] for s in range(1, order_seeds + 1)]
    seeds = []
    for s in range(1, init_seeds + 1):
        seed_cfg = cfg.copy_and_resolve_references()
        with seed_cfg.unlocked():
            seed_cfg.seed = cfg.seed + s  # the base model's init (the data suite stays)
        _, other_base = loading.load_model(
            seed_cfg.model, mesh, suite.tokenizer, seed=seed_cfg.seed
        )
        seeds.append(retrain(f"init_and_order_seed+{s}", {}, init=other_base, seed_offset=s)["q"])
    noise = noise_floor(q0, rerun_q, order, seeds)
    noise["same_seed_max_param_diff"] = rerun_params_diff
    res = analyse(
        delta=delta,
        domains=suite.domain_names,
        capabilities=suite.capabilities,
        q0=q0,
        q0_caps=base_run["caps"],
        plus=plus,
        minus=minus,
        alpha=alphas["alpha"],
        noise=noise,
    )
    curve = base_run["epoch_losses"]
    res.update(
        domain_sizes=list(mix0.target_sizes),
        reference_weighting=weighting,
        alpha={
            k: {"rows": v["rows"], "matrix": v["matrix"].tolist()}
            for k, v in alphas["alpha"].items()
        },
        influence_seconds=alphas["seconds"],
        influence_info=alphas["info"],
        base_epoch_losses=curve,
        last_epoch_change=(curve[-1] - curve[-2]) if len(curve) >= 2 else None,
        last_epoch_relative_change=(curve[-1] / curve[-2] - 1) if len(curve) >= 2 else None,
        runs=runs,
        settings=dict(
            scale_sizes=dict(cfg.data.demo_train_sizes),
            epochs=int(cfg.train.epochs),
            learning_rate=float(cfg.train.learning_rate),
            weight_decay=float(cfg.train.weight_decay),
            batch_size=int(cfg.train.batch_size),
            n_ref=int(cfg.data.demo_n_ref),
            operators=list(operator_names),
            order_seeds=order_seeds,
            init_seeds=init_seeds,
        ),
        wall_seconds=time.perf_counter() - t_start,
    )
    res["_state"] = (model_cfg, params0, suite, mix0, mesh)  # for the test's stage cross-check
    return res


def _fmt(x, spec=".3f", width=0) -> str:
    return format("n/a" if x is None else format(x, spec), f">{width}")


def print_report(res: dict) -> None:
    """The tables, then (last line) the JSON object."""
    curve = res["base_epoch_losses"]
    change, relative = res["last_epoch_change"], res["last_epoch_relative_change"]
    print(
        f"\nbase run: training loss by epoch {[round(x, 4) for x in curve[:3]]} … "
        f"{[round(x, 4) for x in curve[-3:]]}; last epoch's change "
        f"{_fmt(change, '+.4f')} ({_fmt(relative, '+.1%')})"
    )
    print(f"Q_0 = {res['q0']:.5f} ({res['reference_weighting']}-weighted); δ = {res['delta']}")
    keys = [k for k in res["table"] if k.endswith("/exact")]
    print(
        f"\n{'domain':<17}{'|D_j|':>6}{'ΔQ+':>10}{'ΔQ−':>10}{'S':>10}{'|S|/noise':>10}"
        + "".join(f"{'αδ ' + k.split('/')[0]:>14}" for k in keys)
    )
    m = res["measured"]
    for j, name in enumerate(res["domains"]):
        z = res["above_noise"][name]["z_symmetric"]
        preds = "".join(f"{res['predicted_symmetric'][k][j]:>14.5f}" for k in keys)
        print(
            f"{name:<17}{res['domain_sizes'][j]:>6}{m['plus'][j]:>10.5f}{m['minus'][j]:>10.5f}"
            f"{m['symmetric'][j]:>10.5f}{_fmt(z, '.1f', 10)}{preds}"
        )
    print("(S = (ΔQ+ − ΔQ−)/2; αδ = α_exact(all) · δ, the first-order prediction of S)")
    nz = res["noise"]
    print("\nnoise floor (β = 0), ΔQ = Q − Q_0:")
    print(
        f"  (a) same seed rerun:         {_fmt(nz['same_seed_delta'], '.2e')}  "
        f"(max |Δθ| {_fmt(nz.get('same_seed_max_param_diff'), '.2e')})"
    )
    print(f"  (b) other init + order seed: {np.round(nz['seed_deltas'], 5).tolist()}")
    print(f"  (c) other order seed only:   {np.round(nz['order_deltas'], 5).tolist()}")
    print(
        f"  σ_order = {_fmt(nz['sigma_order'], '.5f')} → noise of ΔQ± ≈ "
        f"{_fmt(nz['noise_one_sided'], '.5f')}, of S ≈ {_fmt(nz['noise_symmetric'], '.5f')}; "
        f"σ_seed (init + order) = {_fmt(nz['sigma_seed'], '.5f')}"
    )
    above = [n for n, v in res["above_noise"].items() if v["above_noise"]]
    print(f"  domains with |S| > 2 × noise of S: {above or 'none'}")
    print(f"  mean |S| = {np.mean(np.abs(m['symmetric'])):.5f}")
    print(f"\n{'':<20}" + "".join(f"{s:^24}" for s in ("+δ", "−δ", "symmetric S")))
    print(f"{'operator/scaling':<20}" + f"{'pearson':>8}{'spearman':>9}{'sign':>6} " * 3)
    for key, row in res["table"].items():
        print(
            f"{key:<20}"
            + "".join(
                f"{_fmt(row[s]['pearson'], '.2f', 8)}{_fmt(row[s]['spearman'], '.2f', 9)}"
                f"{_fmt(row[s]['sign_agreement'], '.2f', 6)} "
                for s in SIDES
            )
        )
    n = next(iter(res["table"].values()))["symmetric"]["n"]
    print(
        f"\nsymmetric S (n = {n} domains): p-values, slope of S on αδ; "
        "capability × domain pairs of S"
    )
    print(
        f"{'operator/scaling':<20}{'p pearson':>10}{'p spearman':>11}{'p sign':>8}{'slope':>9}"
        f"{'n':>6}{'pearson':>9}{'spearman':>9}{'p':>8}{'sign':>6}"
    )
    for key, row in res["table"].items():
        sym, cd = row["symmetric"], row["capability_x_domain"] or {}
        print(
            f"{key:<20}{_fmt(sym['pearson_p'], '.3f', 10)}{_fmt(sym['spearman_p'], '.3f', 11)}"
            f"{_fmt(sym['sign_p'], '.3f', 8)}{_fmt(row['slope_symmetric'], '.3g', 9)}"
            f"{_fmt(cd.get('n'), 'd', 6)}{_fmt(cd.get('pearson'), '.2f', 9)}"
            f"{_fmt(cd.get('spearman'), '.2f', 9)}{_fmt(cd.get('spearman_p'), '.3f', 8)}"
            f"{_fmt(cd.get('sign_agreement'), '.2f', 6)}"
        )
    print(f"wall time {res['wall_seconds']:.0f} s")
    print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, default=float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=2, help="× configs/tiny.py domain sizes")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-3, help="peak learning rate (cosine)")
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay")
    parser.add_argument("--delta", type=float, default=0.5, help="β_j = ±δ, one domain at a time")
    parser.add_argument("--order_seeds", type=int, default=3, help="noise floor (c) reruns")
    parser.add_argument("--init_seeds", type=int, default=1, help="noise floor (b) reruns")
    parser.add_argument("--n_ref", type=int, default=32, help="reference items per capability")
    parser.add_argument("--no_harmful", action="store_true", help="leave out arithmetic_wrong")
    parser.add_argument("--operators", default=",".join(OPERATORS))
    parser.add_argument("--workdir", default="", help="keep the runs here (default: temporary)")
    args = parser.parse_args()
    cfg = make_config(
        args.scale,
        args.epochs,
        args.lr,
        weight_decay=args.weight_decay,
        n_ref=args.n_ref,
        harmful=not args.no_harmful,
    )
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    kwargs = dict(
        delta=args.delta,
        order_seeds=args.order_seeds,
        init_seeds=args.init_seeds,
        operator_names=tuple(args.operators.split(",")),
        log=log,
    )
    if args.workdir:
        print_report(run_counterfactual(cfg, args.workdir, **kwargs))
        return
    with tempfile.TemporaryDirectory() as workdir:
        print_report(run_counterfactual(cfg, workdir, **kwargs))


if __name__ == "__main__":
    main()
