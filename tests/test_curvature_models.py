"""Small models shared by the curvature/influence tests (plus a smoke test of each)."""

import chex
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

from ideal_jax.curvature import kfac as kfac_lib
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature import problem as problem_lib


def mlp_outputs(params, batch, tagged):
    """tanh MLP on batch["inputs"] [B, D]; layers named fc0, fc1, ... (kernel [in, out])."""
    x_bd = batch["inputs"]
    names = sorted(params)
    for i, name in enumerate(names):
        kernel, bias = params[name]["kernel"], params[name].get("bias")
        y_bf = x_bd @ kernel + (0.0 if bias is None else bias)
        if name in tagged:
            y_bf = kfac_jax.register_dense(y_bf, x_bd, kernel, bias)
        x_bd = jnp.tanh(y_bf) if i < len(names) - 1 else y_bf
    return x_bd


def mlp_params(sizes, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = {"kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32)}
        if bias:
            layer["bias"] = jnp.asarray(0.1 * rng.normal(size=b), jnp.float32)
        params[f"fc{i}"] = layer
    return params


def classification_batches(sizes, num_batches, batch_size, num_domains=4, seed=1):
    """Synthetic domains: each has its own input shift and label rule."""
    rng = np.random.default_rng(seed)
    shifts = rng.normal(size=(num_domains, sizes[0]))
    rules = rng.normal(size=(num_domains, sizes[0], sizes[-1]))
    out = []
    for _ in range(num_batches):
        dom = rng.integers(0, num_domains, batch_size)
        x = rng.normal(size=(batch_size, sizes[0])) + shifts[dom]
        logits = np.einsum("bd,bdc->bc", x, rules[dom])
        y = np.argmax(logits + rng.gumbel(size=logits.shape), axis=-1)
        out.append(
            {
                "inputs": jnp.asarray(x, jnp.float32),
                "targets": jnp.asarray(y, jnp.int32),
                "weights": jnp.ones(batch_size, jnp.float32),
                "domain_ids": jnp.asarray(dom, jnp.int32),
            }
        )
    return out


def mlp_problem(params, loss="softmax_cross_entropy", patterns=r"fc\d+"):
    layers = layers_lib.select_layers(params, patterns)
    return problem_lib.CurvatureProblem(mlp_outputs, layers, loss=loss, token_mask_key=None)


def tiny_lm(vocab=32, hidden=16, inter=24, layers=1):
    from ideal_jax.model import config, transformer

    cfg = config.ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
    )
    return cfg, transformer.init_params(cfg, jax.random.key(0))


def lm_batches(vocab, num_batches, b, t, num_domains=4, seed=2):
    """Padded single-example rows: prompt, then response tokens, then padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_batches):
        tokens = rng.integers(1, vocab, (b, t + 1))
        lengths = rng.integers(t // 2, t + 1, b)
        prompt = rng.integers(1, t // 2, b)
        pos = np.arange(t)[None]
        seg = (pos < lengths[:, None]).astype(np.int32)
        weights = ((pos >= prompt[:, None]) & (seg > 0)).astype(np.float32)
        dom = rng.integers(0, num_domains, b)
        out.append(
            {
                "tokens": jnp.asarray(tokens[:, :t] * seg, jnp.int32),
                "targets": jnp.asarray(tokens[:, 1:] * seg, jnp.int32),
                "weights": jnp.asarray(weights),
                "segment_ids": jnp.asarray(seg),
                "positions": jnp.asarray(np.broadcast_to(pos, (b, t)) * seg, jnp.int32),
                "domain_ids": jnp.asarray(np.where(seg > 0, dom[:, None], -1), jnp.int32),
            }
        )
    return out


def test_mlp_kfac_smoke():
    params = mlp_params((5, 7, 3))
    problem = mlp_problem(params)
    curvature = kfac_lib.KfacCurvature(problem, "empirical")
    state = kfac_lib.accumulate_factors(
        curvature, params, classification_batches((5, 7, 3), 2, 16), jax.random.key(0)
    )
    assert curvature.block_paths() == ("fc0", "fc1")
    chex.assert_trees_all_equal(float(state.rows), 32.0)
    eig = curvature.kfac_eigenvalues(state)
    chex.assert_shape(eig["fc0"], (6, 7))  # kernel rows + bias row
