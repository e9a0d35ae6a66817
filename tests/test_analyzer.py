"""The influence Analyzer (ideal_jax/influence/analyzer.py) and its CLI (ideal_jax/analyze.py):
its scores are the per-example path's, its α is the token-weighted mean of its scores, the
Kronfluence conversions of docs/influence_conventions.md hold exactly (dense curvature, here; the
real Kronfluence in the slow test), the CLI writes its files and bad input exits 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ideal_jax.curvature import ekfac, operators
from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib
from ideal_jax.data import batching, demo_suite
from ideal_jax.influence import analysis_io, gradients, per_example
from ideal_jax.influence import analyzer as analyzer_lib
from ideal_jax.model import hf_io
from ideal_jax.model.config import ModelConfig
from ideal_jax.model.transformer import init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model(path) -> str:
    tokenizer = demo_suite.build_tokenizer()
    cfg = ModelConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=24,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params = jax.tree.map(lambda x: 3 * x, init_params(cfg, jax.random.key(0)))
    hf_io.save_hf(os.fspath(path), cfg, params, tokenizer)
    return os.fspath(path)


def _write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return os.fspath(path)


TRAIN = [  # 17-32 tokens each: one row length (fewer compilations), 2-9 response tokens
    {"id": "a0", "domain": "add", "prompt": "add: 1+2+3+4=", "response": "10"},
    {"id": "r0", "domain": "rev", "prompt": "rev abcdef", "response": "fedcba"},
    {"id": "a1", "domain": "add", "prompt": "add: 12+30=", "response": "42"},
    {"id": "r1", "domain": "rev", "prompt": "rev xyzuv", "response": "vuzyx"},
    {"id": "a2", "domain": "add", "prompt": "add: 7+7+7=", "response": "21"},
    {"id": "r2", "domain": "rev", "prompt": "rev lo world", "response": "dlrow ol"},
    {"id": "a3", "domain": "add", "prompt": "add: 100+5=", "response": "105"},
]
QUERY = [
    {"id": "q0", "capability": "add", "prompt": "2+2=", "response": "4"},
    {"id": "q1", "capability": "rev", "prompt": "rev abc", "response": "cba"},
    {"id": "q2", "capability": "add", "prompt": "20+22=", "response": "42"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("analyzer")
    return {
        "model": _tiny_model(d / "model"),
        "train": _write_jsonl(d / "train.jsonl", TRAIN),
        "query": _write_jsonl(d / "query.jsonl", QUERY),
        "dir": d,
    }


SMALL = dict(batch_size=4, max_len=64, estimator="empirical")


@pytest.fixture(scope="module")
def ekfac_result(files):
    analyzer = analyzer_lib.Analyzer(files["model"], files["train"], operator="ekfac", **SMALL)
    return analyzer, analyzer.score(files["query"])


def _lower_level_batches(examples, batch_size, pad_id):
    """Plain pad batches in file order (no length sort, no loss positions): another batching."""
    ids_of = {n: g for g, n in enumerate(examples.group_names)}
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples.tokenized[start : start + batch_size])
        out.append(
            batching.fill_rows(
                chunk,
                [np.asarray([i]) for i in range(len(chunk))],
                32,
                ids_of,
                n_rows=batch_size,
                pad_id=pad_id,
            )
        )
    return out


def test_scores_equal_the_per_example_path(ekfac_result):
    """Factors, EK-FAC correction, inverse products and per_example.per_example_scores built by
    hand on differently composed batches give the Analyzer's scores, in file order."""
    analyzer, result = ekfac_result
    params, problem = analyzer.params, analyzer.problem
    pad = analyzer.tokenizer.pad_token_id
    batches = _lower_level_batches(analyzer.train, 4, pad)
    curvature = kfac_lib.curvature_for(problem, "empirical")
    rng = jax.random.key(0)
    state = kfac_lib.accumulate_factors(curvature, params, batches, rng)
    state = ekfac.fit_eigen_correction(curvature, state, params, batches, rng)
    op = operators.build_operator(
        "ekfac",
        problem=problem,
        params=params,
        curvature=curvature,
        state=state,
        damping=0.1,
        relative_damping=True,
    )
    query = result.query
    qbatches = _lower_level_batches(query, 1, pad)
    qgrads = gradients.single_group_mean_gradients(
        problem, params, list(enumerate(qbatches)), query.ids
    )
    vs = [op(qgrads.row(q)) for q in range(len(query))]
    expected = per_example.per_example_scores(problem, params, batches, vs)[: len(TRAIN)]
    assert result.scores.shape == (len(TRAIN), len(QUERY))
    np.testing.assert_allclose(
        result.scores, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max()
    )
    assert [r["id"] for r in result.rows()] == [r["id"] for r in TRAIN]


def test_alpha_is_the_token_weighted_mean_of_the_scores(ekfac_result):
    """α[c, j] = Σ_{q∈c} Σ_{n∈j} w_q w_n S[n, q] / (W_c W_j); row "all" = mean over capabilities."""
    _, result = ekfac_result
    s, w_n, w_q = result.scores, result.train_weights, result.query_weights
    w_expected = np.asarray([t.loss_mask[1:].sum() for t in result.train.tokenized])
    np.testing.assert_array_equal(w_n, w_expected)
    alpha = result.alpha
    assert alpha.rows == ("all", "add", "rev") and alpha.domains == ("add", "rev")
    per_cap = {}
    for cap in ("add", "rev"):
        q = np.asarray([g == cap for g in result.query.groups])
        row = []
        for dom in alpha.domains:
            n = np.asarray([g == dom for g in result.train.groups])
            row.append(w_n[n] @ s[np.ix_(n, q)] @ w_q[q] / (w_n[n].sum() * w_q[q].sum()))
        per_cap[cap] = np.asarray(row)
        np.testing.assert_allclose(alpha.row(cap), per_cap[cap], rtol=1e-4)
    np.testing.assert_allclose(alpha.row("all"), (per_cap["add"] + per_cap["rev"]) / 2, rtol=1e-4)


def test_factors_fitted_once_and_cached(files, tmp_path):
    """Two query sets share one fit; a second Analyzer loads the saved factors."""
    cache = os.fspath(tmp_path / "factors")
    first = analyzer_lib.Analyzer(files["model"], files["train"], factors_dir=cache, **SMALL)
    r1 = first.score(files["query"])
    fit_time = first.timings["fit factors"]
    r2 = first.score(_write_jsonl(tmp_path / "q2.jsonl", QUERY[:1]))
    assert first.timings["fit factors"] == fit_time  # not fitted again
    np.testing.assert_allclose(r2.scores[:, 0], r1.scores[:, 0], rtol=1e-5)
    second = analyzer_lib.Analyzer(files["model"], files["train"], factors_dir=cache, **SMALL)
    r3 = second.score(files["query"])
    assert "fit factors" not in second.timings and r3.factors_file == r1.factors_file
    np.testing.assert_allclose(r3.scores, r1.scores, rtol=1e-5)


def test_settings_defaults_are_the_configs():
    sys.path.insert(0, ROOT)
    from configs import common

    cfg = common.base_config()
    d = analysis_io.Settings()
    assert (d.layers, d.estimator, d.correction) == (
        cfg.curvature.layers,
        cfg.curvature.estimator,
        cfg.curvature.correction,
    )
    assert (d.damping, d.relative_damping) == (
        cfg.curvature.damping,
        cfg.curvature.relative_damping,
    )
    assert (d.operator, d.scaling, d.reference_weighting) == (
        cfg.influence.operator,
        cfg.influence.scaling,
        cfg.influence.reference_weighting,
    )


def test_gguf_model_is_accepted(files, tmp_path):
    """A llama.cpp `.gguf` file is a model like a Hugging Face directory (its own tokenizer)."""
    pytest.importorskip("gguf")
    pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gguf_import import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    analyzer = analyzer_lib.Analyzer(
        os.fspath(path), files["train"], operator="identity", batch_size=8, max_len=128
    )
    result = analyzer.score(files["query"])
    assert result.scores.shape == (len(TRAIN), len(QUERY))
    assert np.all(np.isfinite(result.scores)) and np.any(result.scores != 0)
    assert result.alpha.domains == ("add", "rev")


# -- Kronfluence's conventions, from their definitions (dense, exact) ------------------------------
def test_kronfluence_conversion_exact(files):
    """docs/influence_conventions.md: with H_K = (1/N) Σ_n u_n u_nᵀ (u_n the gradient of example
    n's SUMMED loss; Kronfluence's empirical-Fisher EK-FAC target), λ_K = w̄ λ and
    S_K[q, n] = u_qᵀ (H_K + λ_K)⁻¹ u_n (positive = helpful), to_kronfluence_scores maps the
    Analyzer's scores (operator exact, empirical curvature, absolute λ) onto S_K exactly."""
    lam = 0.05
    analyzer = analyzer_lib.Analyzer(
        files["model"],
        files["train"],
        operator="exact",
        exact_kind="empirical",
        damping=lam,
        relative_damping=False,
        batch_size=2,
        max_len=64,
    )
    result = analyzer.score(files["query"])
    params, problem = analyzer.params, analyzer.problem
    selected, rest = layers_lib.split_params(params, problem.layers)
    pad = analyzer.tokenizer.pad_token_id

    def summed_loss_grad(batch):
        fn = lambda s: problem_lib.weighted_loss_sum(
            problem, layers_lib.merge_params(s, rest), batch
        )
        return np.asarray(ravel_pytree(jax.grad(fn, has_aux=True)(selected)[0])[0], np.float64)

    u_train = np.stack([summed_loss_grad(b) for b in _lower_level_batches(result.train, 1, pad)])
    u_query = np.stack([summed_loss_grad(b) for b in _lower_level_batches(result.query, 1, pad)])
    h_k = u_train.T @ u_train / len(u_train)
    w_bar = float(np.mean(result.train_weights))
    lam_k = analysis_io.to_kronfluence_damping(lam, w_bar)
    s_k = u_query @ np.linalg.solve(h_k + lam_k * np.eye(len(h_k)), u_train.T)  # [Q, N]
    converted = analysis_io.to_kronfluence_scores(
        result.scores, result.train_weights, result.query_weights
    )
    np.testing.assert_allclose(converted, s_k, rtol=1e-3, atol=1e-4 * np.abs(s_k).max())
    # sign: Kronfluence's positive (helpful) is our negative
    assert np.all(np.sign(converted) == -np.sign(result.scores.T))


def test_worked_example_numbers():
    """docs/influence_conventions.md's worked example through the two conversion functions."""
    w_n = [10, 20, 30, 40]
    assert float(np.mean(w_n)) == 25.0
    assert analysis_io.to_kronfluence_damping(0.01, np.mean(w_n)) == pytest.approx(0.25)
    s = np.zeros((4, 1))
    s[2, 0] = -0.003
    k = analysis_io.to_kronfluence_scores(s, w_n, [8])
    assert k.shape == (1, 4) and k[0, 2] == pytest.approx(0.0288)
    assert -k[0, 2] * 25 / (30 * 8) == pytest.approx(-0.003)


# -- the command line ---
def _cli(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run(
        [sys.executable, "-m", "ideal_jax.analyze", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def test_cli_end_to_end(files, ekfac_result, tmp_path):
    """The CLI writes the files (the in-process Analyzer's numbers), refuses to overwrite them,
    and leaves factors that a later Analyzer (or `--factors`) reloads instead of refitting."""
    out = tmp_path / "out"
    args = ["--model", files["model"], "--train", files["train"], "--query", files["query"]]
    args += ["--batch_size", "4", "--max_len", "64", "--estimator", "empirical"]
    got = _cli(*args, "--out", os.fspath(out))
    assert got.returncode == 0, got.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "scores.jsonl")]
    matrix = np.load(out / "scores.npy")
    alpha = json.load(open(out / "alpha.json"))
    assert [r["id"] for r in rows] == [r["id"] for r in TRAIN] and matrix.shape == (7, 3)
    np.testing.assert_allclose([r["scores"]["q1"] for r in rows], matrix[:, 1], rtol=1e-6)
    _, result = ekfac_result
    np.testing.assert_allclose(matrix, result.scores, rtol=1e-4, atol=1e-6)
    assert alpha["rows"] == ["all", "add", "rev"] and "stderr" in alpha
    np.testing.assert_allclose(alpha["matrix"], result.alpha.matrix, rtol=1e-4)
    assert "fit factors" in got.stderr and "helpful" in got.stdout
    # a second run refuses to overwrite, before any work, and the results stay
    again = _cli(*args, "--out", os.fspath(out))
    assert again.returncode == 2 and "already exist" in again.stderr
    assert np.array_equal(np.load(out / "scores.npy"), matrix)
    reload = analyzer_lib.Analyzer(
        files["model"], files["train"], factors_dir=os.fspath(out / "factors"), **SMALL
    )
    np.testing.assert_allclose(reload.score(files["query"]).scores, matrix, rtol=1e-4, atol=1e-6)
    assert "fit factors" not in reload.timings and "load factors" in reload.timings


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_file", "file {d}/nope.jsonl"),
        ("no_response", "record line 2, field 'response'"),
        ("empty_query", "query set is empty"),
        ("truncated_query", "record line 1, field 'response'"),
        ("no_domain", "record line 2, field 'domain'"),
    ],
)
def test_cli_bad_input_exits_2(files, tmp_path, case, needle):
    d = tmp_path
    train, query, extra = files["train"], files["query"], []
    if case == "missing_file":
        query = os.fspath(d / "nope.jsonl")
    elif case == "no_response":
        query = _write_jsonl(d / "q.jsonl", [QUERY[0], {"capability": "add", "prompt": "1+1="}])
    elif case == "empty_query":
        query = _write_jsonl(d / "q.jsonl", [])
    elif case == "truncated_query":
        query = _write_jsonl(d / "q.jsonl", [{"prompt": "p" * 80, "response": "4"}])
        extra = ["--truncate", "right"]
    elif case == "no_domain":
        train = _write_jsonl(d / "t.jsonl", [TRAIN[0], {"prompt": "1+1=", "response": "2"}])
    got = _cli(
        "--model", files["model"], "--train", train, "--query", query,
        "--out", os.fspath(d / "out"), "--max_len", "64", *extra,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr[-2000:]
    last = got.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and needle.format(d=d) in last, last
    assert not os.path.exists(d / "out" / "scores.jsonl")


# -- against Kronfluence itself (optional dependency) ---
@pytest.mark.slow
@pytest.mark.parametrize("relative", [False, True])
def test_scores_match_kronfluence(files, relative):
    """EK-FAC on the same HF Llama and tokens: the Analyzer's scores, converted with
    to_kronfluence_scores (and the damping with to_kronfluence_damping, or the same relative
    factor), equal Kronfluence's; its mean EK-FAC eigenvalue per layer is w̄ times ours."""
    from ideal_jax.influence import kronfluence_ref

    if not kronfluence_ref.available():
        pytest.skip("kronfluence / torch not installed")
    lam = 0.1 if relative else 1e-3
    analyzer = analyzer_lib.Analyzer(
        files["model"],
        files["train"],
        operator="ekfac",
        damping=lam,
        relative_damping=relative,
        **SMALL,
    )
    result = analyzer.score(files["query"])
    pad = analyzer.tokenizer.pad_token_id
    w_bar = float(np.mean(result.train_weights))
    modules = [f"model.{p}" for p in analyzer.layers]
    _, theirs, lambda_means = kronfluence_ref.pairwise_scores(
        files["model"],
        kronfluence_ref.dataset(_lower_level_batches(result.train, 1, pad)),
        kronfluence_ref.dataset(_lower_level_batches(result.query, 1, pad)),
        modules,
        damping_factor=None if relative else analysis_io.to_kronfluence_damping(lam, w_bar),
        train_batch_size=4,
        query_batch_size=3,
    )
    ours = analysis_io.to_kronfluence_scores(
        result.scores, result.train_weights, result.query_weights
    )
    pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
    worst = float(np.max(np.abs(ours - theirs)) / np.abs(theirs).max())
    print(f"relative={relative}: Pearson {pearson:.6f}, max |diff| / max |score| {worst:.2e}")
    assert pearson >= 0.999, pearson
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-4 * np.abs(theirs).max())
    state_means = {
        p: float(np.mean(v)) for p, v in ekfac.ekfac_eigenvalues(analyzer.curvature_state).items()
    }
    for p in analyzer.layers:
        np.testing.assert_allclose(lambda_means[f"model.{p}"], w_bar * state_means[p], rtol=1e-3)
