"""K-FAC factors of the training-loss curvature H (Lemma 1) via kfac-jax, used standalone.

A `CurvatureProblem` says how to run the model with tagged layers and which loss to register. The
training loss is the token-weighted mean L = Σ_t w_t ℓ_t / Σ_t w_t (w = 1 on response tokens), so
H here is the curvature of *that* mean, matching the gradients in `ideal_jax.influence`.

Normalisation. kfac-jax averages each batch's statistics over its R_b rows (B·T for an LM, padding
included) and we weight batches by R_b (`ema_old=1, ema_new=R_b`), so its factors are
A = Σ x xᵀ / R and G = Σ δ δᵀ / R over all rows. The K-FAC ("expand") estimate of H for the
weighted-mean loss is then  H ≈ (R/M)(R/W) · A ⊗ G,  M = non-padding tokens, W = Σ w. We keep that
scalar (`kron_scale`) in the state instead of rescaling kfac-jax's factors.

Biased layers. kfac-jax appends a constant 1 to every row's input for the bias, padding rows
included, so its A[bias, bias] = Σ_rows 1 / R = 1 whatever the padding (the x part is right: tagged
inputs are zero on padding rows). The bias entry of the real-token factor is Σ_real 1 / R = M / R;
`finalize` sets it before the eigendecomposition, so that after `kron_scale` it is exactly 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np

from ideal_jax.curvature import layers as layers_lib
from ideal_jax.utils import progress
from ideal_jax.utils.errors import InputError

Batch = Mapping[str, jax.Array]
Params = dict
OutputsFn = Callable[[Params, Batch, frozenset], jax.Array]

# Our names → kfac-jax estimation modes. The "*_direct" modes are avoided (normalisation bug).
ESTIMATION_MODES = {
    "empirical": "fisher_empirical",  # empirical Fisher: gradients at the data's targets
    "fisher": "fisher_gradients",  # true Fisher (= GGN for softmax CE): targets sampled from model
    "ggn_exact": "ggn_exact",  # exact GGN output factor; loops over outputs: small models only
}
LOSSES = ("softmax_cross_entropy", "squared_error")


@dataclasses.dataclass(frozen=True)
class CurvatureProblem:
    """A model and its loss as the curvature and influence code see them.

    outputs_fn(params, batch, tagged_layers) -> outputs [..., C]: runs the model and wraps each
      layer whose path is in `tagged_layers` in `kfac_jax.register_dense`.
    loss: "softmax_cross_entropy" (batch["targets"] int [...]) or "squared_error" (½‖y − t‖²,
      batch["targets"] float [..., C]). batch["weights"] [...] holds 0/1 token weights.
    token_mask_key: batch field whose non-zero entries are real (non-padding) rows.
    """

    outputs_fn: OutputsFn
    layers: tuple[str, ...]
    loss: str = "softmax_cross_entropy"
    token_mask_key: str | None = "segment_ids"

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise InputError(f"unknown loss {self.loss!r}; one of {LOSSES}", field="curvature.loss")


@functools.lru_cache(maxsize=32)
def lm_problem(model_cfg: Any, layers: tuple[str, ...]) -> CurvatureProblem:
    """The decoder LM of `ideal_jax.model.transformer` with response-token cross-entropy.

    Cached: the same (model, layers) gives the same object, so every jitted pass built on it is
    compiled once per process (IDEAL's rounds reuse them).
    """
    from ideal_jax.model import transformer

    def outputs_fn(params: Params, batch: Batch, tagged: frozenset) -> jax.Array:
        tags = None
        if tagged:
            tags = transformer.KfacTags(frozenset(tagged), token_mask_bt=batch["segment_ids"] != 0)
        return transformer.forward(
            model_cfg,
            params,
            batch["tokens"],
            batch["positions"],
            batch["segment_ids"],
            kfac_tags=tags,
        )

    return CurvatureProblem(outputs_fn=outputs_fn, layers=tuple(layers))


# Optional batch fields [B, K]: the positions (along T) of the rows that carry loss weight, and
# which of the K slots are real (1) or filler (0). With them the loss, its softmax and the Fisher's
# sampled targets are formed at those K positions only, not at all T (prompt and padding rows have
# weight 0 and contribute nothing). The layers still see all T rows.
LOSS_POSITIONS = "loss_positions"
LOSS_VALID = "loss_valid"


def _at_loss_positions(x: jax.Array, batch: Batch) -> jax.Array:
    """x [B, T, ...] → [B, K, ...] at batch[LOSS_POSITIONS] (x itself without that field)."""
    if LOSS_POSITIONS not in batch:
        return x
    idx_bk = batch[LOSS_POSITIONS]
    idx = idx_bk.reshape(idx_bk.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def loss_outputs(problem: CurvatureProblem, outputs: jax.Array, batch: Batch) -> jax.Array:
    """The model outputs of the loss rows, [R, C] in float32."""
    del problem
    outputs = _at_loss_positions(outputs, batch)
    return outputs.reshape(-1, outputs.shape[-1]).astype(jnp.float32)


def loss_rows(problem: CurvatureProblem, batch: Batch):
    """(targets [R] or [R, C], weights [R], real-row mask [R]) of the loss rows."""
    targets = _at_loss_positions(batch["targets"], batch)
    if problem.loss == "softmax_cross_entropy":
        targets = targets.reshape(-1)
    else:
        targets = targets.reshape(-1, targets.shape[-1])
    weights = _at_loss_positions(batch["weights"].astype(jnp.float32), batch)
    key = problem.token_mask_key
    real = (batch[key] != 0) if key and key in batch else jnp.ones_like(batch["weights"])
    real = _at_loss_positions(real.astype(jnp.float32), batch)
    if LOSS_POSITIONS in batch:
        valid = batch[LOSS_VALID].astype(jnp.float32)
        weights, real = weights * valid, real * valid
    return targets, weights.reshape(-1), real.reshape(-1)


def flat_rows(problem: CurvatureProblem, outputs: jax.Array, batch: Batch):
    """(outputs [R, C], targets [R] or [R, C], weights [R], real-row mask [R]) of the loss rows:
    every token row, or the K rows per example named by batch[LOSS_POSITIONS]."""
    return (loss_outputs(problem, outputs, batch), *loss_rows(problem, batch))


def with_loss_positions(batch: Batch) -> Batch:
    """`batch` with LOSS_POSITIONS naming every token row when it has none ([B, T] batches only).

    kfac-jax traces its loss once per estimator and refuses a batch of another structure; with this
    the estimator (cached per problem) takes batches with and without loss positions alike.
    """
    if LOSS_POSITIONS in batch or jnp.ndim(batch["weights"]) != 2:
        return batch
    b, t = jnp.shape(batch["weights"])
    return {
        **batch,
        LOSS_POSITIONS: jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        LOSS_VALID: jnp.ones((b, t), jnp.float32),
    }


def add_loss_positions(batch: dict, k: int | None = None, minimum: int = 8) -> dict:
    """Host-side: `batch` (numpy, [B, T] fields) with LOSS_POSITIONS / LOSS_VALID [B, K] added.

    K: `k`, else the largest number of weighted tokens in a row rounded up to a power of two (at
    least `minimum`; few shapes, few compilations). Filler slots point at position 0, valid 0.
    """
    weighted_bt = np.asarray(batch["weights"]) > 0
    counts_b = weighted_bt.sum(axis=1)
    most = int(counts_b.max()) if counts_b.size else 0
    if k is None:
        k = max(minimum, 1 << (max(most, 1) - 1).bit_length())
    if most > k:
        raise ValueError(f"a row has {most} weighted tokens, more than k={k}")
    b = weighted_bt.shape[0]
    positions_bk = np.zeros((b, k), np.int32)
    valid_bk = np.zeros((b, k), np.float32)
    rows_n, cols_n = np.nonzero(weighted_bt)  # row-major: each row's positions in order
    slot_n = np.arange(rows_n.size) - np.repeat(np.cumsum(counts_b) - counts_b, counts_b)
    positions_bk[rows_n, slot_n] = cols_n
    valid_bk[rows_n, slot_n] = 1.0
    return {**batch, LOSS_POSITIONS: positions_bk, LOSS_VALID: valid_bk}


def row_losses(problem: CurvatureProblem, outputs_rc: jax.Array, targets: jax.Array) -> jax.Array:
    """Unweighted per-row loss ℓ_r [R]."""
    if problem.loss == "softmax_cross_entropy":
        logp_rc = jax.nn.log_softmax(outputs_rc, axis=-1)
        return -jnp.take_along_axis(logp_rc, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return 0.5 * jnp.sum((outputs_rc - targets) ** 2, axis=-1)


def weighted_loss_sum(problem: CurvatureProblem, params: Params, batch: Batch):
    """(Σ_r w_r ℓ_r, Σ_r w_r) of one batch, untagged forward."""
    outputs_rc, targets, weights_r, _ = flat_rows(
        problem, problem.outputs_fn(params, batch, frozenset()), batch
    )
    return jnp.sum(weights_r * row_losses(problem, outputs_rc, targets)), jnp.sum(weights_r)


@flax.struct.dataclass
class CurvatureState:
    """Everything the inverse-Hessian operators need; a pytree that can be saved and reloaded.

    kfac: kfac-jax's BlockDiagonalCurvature.State (factors A, G and their eigendecompositions).
    rows/tokens/weight: totals R, M, W over the factor pass (see module docstring).
    correction: EK-FAC eigenvalues Λ* per layer path, [D_in(+1), D_out] (None before the 2nd pass).
    """

    kfac: Any
    rows: jax.Array
    tokens: jax.Array
    weight: jax.Array
    correction: dict | None = None
    correction_weight: jax.Array | None = None
    layers: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    block_paths: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    mode: str = flax.struct.field(pytree_node=False, default="empirical")

    @property
    def kron_scale(self) -> jax.Array:
        return (self.rows / jnp.maximum(self.tokens, 1.0)) * (
            self.rows / jnp.maximum(self.weight, 1e-30)
        )


class KfacCurvature:
    """Holds the kfac-jax estimator and jitted passes; all state is passed in and returned."""

    def __init__(self, problem: CurvatureProblem, mode: str = "fisher"):
        if mode not in ESTIMATION_MODES:
            raise InputError(
                f"unknown mode {mode!r}; one of {sorted(ESTIMATION_MODES)}",
                field="curvature.estimator",
            )
        self.problem, self.mode = problem, mode
        self.estimator = kfac_jax.BlockDiagonalCurvature(
            self._kfac_loss,
            default_estimation_mode=ESTIMATION_MODES[mode],
            auto_register_tags=False,
            distributed_multiplies=False,
            distributed_cache_updates=False,
        )
        self._update = jax.jit(self._update_impl)
        self._cache = jax.jit(self._cache_impl)
        self._inverse = jax.jit(self._inverse_impl)

    # -- the loss kfac-jax traces: f32, explicit tags, response-token mask ---------------------
    def _kfac_loss(self, selected: dict, rest: Params, batch: Batch) -> jax.Array:
        p = self.problem
        outputs = p.outputs_fn(layers_lib.merge_params(selected, rest), batch, frozenset(p.layers))
        outputs_rc, targets, weights_r, _ = flat_rows(p, outputs, batch)
        # fisher_empirical divides its vjp by sqrt(batch size) (R_b, the token rows the layers see,
        # not the loss rows); this weight undoes it so that every mode's G is Σ δδᵀ / R_b (see
        # module docstring).
        coeff = float(np.sqrt(batch["weights"].size)) if self.mode == "empirical" else 1.0
        if p.loss == "softmax_cross_entropy":
            kfac_jax.register_softmax_cross_entropy_loss(
                outputs_rc, targets, mask=weights_r, weight=coeff
            )
        else:  # ½ w‖y − t‖² == ½‖√w y − √w t‖²; kfac-jax's squared error is weight·Σ(t − y)².
            sw_r1 = jnp.sqrt(weights_r)[:, None]
            kfac_jax.register_squared_error_loss(sw_r1 * outputs_rc, sw_r1 * targets, 0.5 * coeff)
        losses = row_losses(p, outputs_rc, targets)
        return jnp.sum(weights_r * losses) / jnp.maximum(jnp.sum(weights_r), 1.0)

    # -- passes ------------------------------------------------------------------------------------
    def init(self, params: Params, batch: Batch, rng: jax.Array) -> CurvatureState:
        """Zero factors for the selected layers (traces the loss once to find the tags)."""
        selected, rest = layers_lib.split_params(params, self.problem.layers)
        kstate = self.estimator.init(
            rng,
            (selected, rest, with_loss_positions(batch)),
            exact_powers_to_cache=-1,
            approx_powers_to_cache=None,
            cache_eigenvalues=True,
        )
        zero = jnp.zeros((), jnp.float32)
        return CurvatureState(
            kfac=kstate,
            rows=zero,
            tokens=zero,
            weight=zero,
            layers=tuple(self.problem.layers),
            block_paths=self.block_paths(),
            mode=self.mode,
        )

    def block_paths(self) -> tuple[str, ...]:
        """Layer path of each kfac-jax block, in block order."""
        index = self.estimator.params_block_index
        by_block = {int(v["kernel"]): path for path, v in index.items()}
        return tuple(by_block[i] for i in range(len(by_block)))

    def _update_impl(self, state: CurvatureState, params: Params, batch: Batch, rng):
        selected, rest = layers_lib.split_params(params, self.problem.layers)
        weights_r = batch["weights"].reshape(-1).astype(jnp.float32)
        key = self.problem.token_mask_key
        real_r = (batch[key] != 0) if key and key in batch else jnp.ones_like(weights_r)
        n_rows = weights_r.shape[0]
        kstate = self.estimator.update_curvature_matrix_estimate(
            state.kfac,
            ema_old=1.0,
            ema_new=float(n_rows),
            identity_weight=0.0,
            batch_size=n_rows,
            rng=rng,
            func_args=(selected, rest, with_loss_positions(batch)),
        )
        return state.replace(
            kfac=kstate,
            rows=state.rows + n_rows,
            tokens=state.tokens + jnp.sum(real_r),
            weight=state.weight + jnp.sum(weights_r),
        )

    def update(self, state: CurvatureState, params: Params, batch: Batch, rng) -> CurvatureState:
        """Adds one batch to the (exact, weighted) average of the factors."""
        return self._update(state, params, batch, rng)

    def _cache_impl(self, state: CurvatureState) -> CurvatureState:
        kstate = self.estimator.update_cache(
            state.kfac,
            identity_weight=0.0,
            exact_powers=-1,
            approx_powers=None,
            eigenvalues=True,
            pmap_axis_name=None,
        )
        return state.replace(kfac=kstate)

    def finalize(self, state: CurvatureState) -> CurvatureState:
        """Eigendecomposes A and G; raises InputError on an empty pass or non-finite factors."""
        if float(state.weight) <= 0:
            raise InputError(
                "curvature pass saw no response tokens (all weights are 0)", field="weights"
            )
        state = self._cache(self._real_token_bias(state))
        check_finite(state)
        return state

    def _real_token_bias(self, state: CurvatureState) -> CurvatureState:
        """A[bias, bias] := M / R on every biased block (see module docstring)."""
        index = self.estimator.params_block_index
        share = state.tokens / jnp.maximum(state.rows, 1.0)
        blocks = list(state.kfac.blocks_states)
        for i, path in enumerate(self.block_paths()):
            if "bias" not in index[path]:
                continue
            a = blocks[i].factors[0]
            a = dataclasses.replace(a, value=a.value.at[-1, -1].set(share.astype(a.value.dtype)))
            blocks[i] = dataclasses.replace(blocks[i], factors=(a, *blocks[i].factors[1:]))
        return state.replace(kfac=dataclasses.replace(state.kfac, blocks_states=tuple(blocks)))

    def eigenbases(self, state: CurvatureState) -> dict[str, tuple[jax.Array, ...]]:
        """path → (Q_A, λ_A, Q_G, λ_G) from kfac-jax's cache (A: input, G: output factor)."""
        out = {}
        for path, bstate in zip(self.block_paths(), state.kfac.blocks_states):
            c = bstate.cache
            out[path] = (
                c["0_factor_eigen_vectors"],
                c["0_factor_eigenvalues"],
                c["1_factor_eigen_vectors"],
                c["1_factor_eigenvalues"],
            )
        return out

    def kfac_eigenvalues(self, state: CurvatureState) -> dict[str, jax.Array]:
        """path → K-FAC eigenvalues kron_scale · λ_A λ_Gᵀ, [D_in(+1), D_out]."""
        return {
            p: state.kron_scale * qa_la_qg_lg[1][:, None] * qa_la_qg_lg[3][None, :]
            for p, qa_la_qg_lg in self.eigenbases(state).items()
        }

    def _inverse_impl(self, state: CurvatureState, vector: dict, damping: tuple) -> dict:
        s = state.kron_scale
        result = self.estimator.multiply_inverse(
            state.kfac,
            vector,
            identity_weight=tuple(d / s for d in damping),
            exact_power=True,
            use_cached=True,
            pmap_axis_name=None,
        )
        return jax.tree.map(lambda x: x / s, result)

    def multiply_inverse(self, state: CurvatureState, vector: dict, damping: dict) -> dict:
        """(kron_scale · A⊗G + λ_b I)⁻¹ v per block; `damping` maps path → λ_b (absolute)."""
        return self._inverse(state, vector, tuple(damping[p] for p in self.block_paths()))


def block_damping(eigenvalues: Mapping[str, jax.Array], damping: float, relative: bool) -> dict:
    """λ_b per block: `damping` × the mean block eigenvalue (relative) or absolute."""
    if not relative:
        return {p: jnp.asarray(damping, jnp.float32) for p in eigenvalues}
    return {p: damping * jnp.mean(ev) for p, ev in eigenvalues.items()}


def check_finite(state: CurvatureState) -> None:
    """Raises InputError naming the first non-finite factor/eigenvalue in `state`."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    for key_path, leaf in leaves:
        if isinstance(leaf, jax.Array) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise InputError(
                "non-finite curvature statistic (check for NaN/inf losses or activations)",
                field=jax.tree_util.keystr(key_path),
            )


def accumulate_factors(
    curvature: KfacCurvature,
    params: Params,
    batches: Iterable[Batch],
    rng: jax.Array,
    state: CurvatureState | None = None,
) -> CurvatureState:
    """One streamed pass over `batches` → finalized (eigendecomposed) K-FAC state."""
    for i, batch in enumerate(progress.bar(batches, "curvature factors")):
        if state is None:
            state = curvature.init(params, batch, rng)
        state = curvature.update(state, params, batch, jax.random.fold_in(rng, i))
    if state is None:
        raise InputError("no batches for the curvature pass", field="data")
    return curvature.finalize(state)


@functools.lru_cache(maxsize=32)
def curvature_for(problem: CurvatureProblem, mode: str = "fisher") -> KfacCurvature:
    """One KfacCurvature (and its jitted passes) per (problem, mode) for the whole process."""
    return KfacCurvature(problem, mode=mode)
