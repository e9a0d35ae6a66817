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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ideal_jax import sharding
from ideal_jax.curvature import layers as layers_lib
from ideal_jax.curvature.problem import (
    Batch,
    CurvatureProblem,
    Params,
    fisher_targets,
    flat_rows,
    row_losses,
    with_loss_positions,
)
from ideal_jax.utils import progress
from ideal_jax.utils.errors import InputError

# Our names → kfac-jax estimation modes. The "*_direct" modes are avoided (normalisation bug).
ESTIMATION_MODES = {
    "empirical": "fisher_empirical",  # empirical Fisher: gradients at the data's targets
    "fisher": "fisher_gradients",  # true Fisher (= GGN for softmax CE): targets sampled from model
    "ggn_exact": "ggn_exact",  # exact GGN output factor; loops over outputs: small models only
}


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

    def __init__(self, problem: CurvatureProblem, mode: str = "fisher", mesh: Mesh | None = None):
        """mesh: where the parameters are placed (None: one device / unplaced). kfac-jax traces
        the loss once per batch shape and keeps the trace, so the activation shardings
        (sharding.activation_mesh) are part of the object: one curvature per mesh."""
        if mode not in ESTIMATION_MODES:
            raise InputError(
                f"unknown mode {mode!r}; one of {sorted(ESTIMATION_MODES)}",
                field="curvature.estimator",
            )
        self.problem, self.mode, self.mesh = problem, mode, mesh
        self.estimator = kfac_jax.BlockDiagonalCurvature(
            self._kfac_loss,
            default_estimation_mode=ESTIMATION_MODES[mode],
            auto_register_tags=False,
            distributed_multiplies=False,
            distributed_cache_updates=False,
        )
        self._update = jax.jit(self._update_impl)
        self._sharded_updates: dict = {}  # mesh -> the placed, donating update (update_fn)
        self._cache = jax.jit(self._cache_impl)
        self._inverse = jax.jit(self._inverse_impl)

    # -- the loss kfac-jax traces: f32, explicit tags, response-token mask ---------------------
    def _kfac_loss(self, selected: dict, rest: Params, batch: Batch) -> jax.Array:
        with sharding.activation_mesh(self.mesh):  # activations pinned to rows on the mesh
            return self._kfac_loss_in_mesh(selected, rest, batch)

    def _kfac_loss_in_mesh(self, selected: dict, rest: Params, batch: Batch) -> jax.Array:
        p = self.problem
        outputs = p.outputs_fn(layers_lib.merge_params(selected, rest), batch, frozenset(p.layers))
        # Loss rows over (data, fsdp) like the batch: left to XLA, they take the layout of the
        # row-sharded factors they feed and are replicated to move back.
        outputs_rc, targets, weights_r, _ = jax.tree.map(
            sharding.constrain_rows, flat_rows(p, outputs, batch)
        )
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

    def _update_impl(self, state: CurvatureState, params: Params, batch: Batch, rng, keep=False):
        """One batch into the factors; keep=True (captured factors only) also returns the batch's
        captures {path: (X̃ [B, T, I], Δ [B, T, O])} for an EK-FAC correction without a second
        model pass (`accumulate_factors_keeping`)."""
        selected, rest = layers_lib.split_params(params, self.problem.layers)
        weights_r = batch["weights"].reshape(-1).astype(jnp.float32)
        key = self.problem.token_mask_key
        real_r = (batch[key] != 0) if key and key in batch else jnp.ones_like(weights_r)
        n_rows = weights_r.shape[0]
        caught = None
        if self.captured_factors:
            kstate, caught = self._captured_update(state.kfac, selected, rest, batch, rng, n_rows)
        else:
            kstate = self.estimator.update_curvature_matrix_estimate(
                state.kfac,
                ema_old=1.0,
                ema_new=float(n_rows),
                identity_weight=0.0,
                batch_size=n_rows,
                rng=rng,
                func_args=(selected, rest, with_loss_positions(batch)),
            )
        state = state.replace(
            kfac=kstate,
            rows=state.rows + n_rows,
            tokens=state.tokens + jnp.sum(real_r),
            weight=state.weight + jnp.sum(weights_r),
        )
        return (state, caught) if keep else state

    @property
    def captured_factors(self) -> bool:
        """Whether the factor pass forms A and G itself from the model's captures (one forward and
        one activation-only backward per batch, curvature/captures.py) instead of through
        kfac-jax's tracer, which evaluates the forward twice. The estimator is the same:
        kfac-jax's dense-block statistics A_b = X̃ᵀX̃ / R_b and G_b = ΔᵀΔ / R_b, added into its
        block states with the same weights; `ggn_exact` and problems without a capture mode keep
        kfac-jax's own pass."""
        p = self.problem
        return p.probe_capture and p.loss == "softmax_cross_entropy" and self.mode != "ggn_exact"

    def _captured_update(self, kstate, selected: dict, rest: Params, batch: Batch, rng, n_rows):
        from ideal_jax.curvature import captures  # captures imports this module's problem only

        p = self.problem
        batch = with_loss_positions(batch)

        def cotangent(outputs_rc):  # δ: one draw over the batch's rows, as kfac-jax draws
            t_r, c_r = fisher_targets(p, self.mode, outputs_rc, batch, rng)
            return jax.grad(lambda o: jnp.sum(c_r * row_losses(p, o, t_r)))(outputs_rc)

        with sharding.activation_mesh(self.mesh):
            _, caught = captures.layer_captures(p, selected, rest, batch, cotangent)
        blocks = list(kstate.blocks_states)
        for i, path in enumerate(self.block_paths()):
            x_bti, d_bto = caught[path]
            x_ri = sharding.constrain_rows(x_bti.reshape(-1, x_bti.shape[-1]))
            d_ro = sharding.constrain_rows(d_bto.reshape(-1, d_bto.shape[-1]))
            bstate = blocks[i].copy()
            bstate.factors[0].update((x_ri.T @ x_ri) / n_rows, 1.0, float(n_rows))
            bstate.factors[1].update((d_ro.T @ d_ro) / n_rows, 1.0, float(n_rows))
            blocks[i] = bstate
        return dataclasses.replace(kstate, blocks_states=tuple(blocks)), caught

    def update(self, state: CurvatureState, params: Params, batch: Batch, rng) -> CurvatureState:
        """Adds one batch to the (exact, weighted) average of the factors."""
        return self._update(state, params, batch, rng)

    def update_fn(self, mesh: Mesh, state_like: Any):
        """The factor update placed on `mesh`: the state row-sharded in and out
        (`state_shardings`) and donated, params and batch as they come (already sharded).

        One jitted object per mesh for the process: the influence stage runs it and
        memory_plan.compile_curvature_pass lowers the very same object for its memory table.
        `state_like`: a state or its abstract shapes (only their shapes are read, once per mesh).
        """
        if self.mesh is not None and mesh != self.mesh:
            raise ValueError(f"this curvature was built for mesh {self.mesh}, not {mesh}")
        if mesh not in self._sharded_updates:
            state_sh = state_shardings(state_like, mesh)
            self._sharded_updates[mesh] = jax.jit(
                self._update_impl,
                in_shardings=(state_sh, None, None, None),
                out_shardings=state_sh,
                donate_argnums=0,
            )
        return self._sharded_updates[mesh]

    def keeping_update_fn(self, mesh: Mesh | None, state_like: Any):
        """(state, params, batch, rng) → (state, the batch's captures): the factor update that
        also returns what it captured (captured_factors only), jitted once per mesh."""
        if not self.captured_factors:
            raise ValueError("only the captured factor pass can keep its captures")
        key = ("keep", mesh)
        if key not in self._sharded_updates:
            fn = functools.partial(self._update_impl, keep=True)
            if mesh is None:
                self._sharded_updates[key] = jax.jit(fn)
            else:
                state_sh = state_shardings(state_like, mesh)
                self._sharded_updates[key] = jax.jit(
                    fn,
                    in_shardings=(state_sh, None, None, None),
                    out_shardings=(state_sh, None),
                    donate_argnums=0,
                )
        return self._sharded_updates[key]

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
        # kfac-jax's jitted eigendecompositions: on this project's 2-core CPU they beat LAPACK on
        # the host (`_host_cache`; benchmarks/bench_eigh.py: 1.22 s vs 1.62 s for 24 factors of
        # 256 and 1024, jax 0.10.2), so the host path is kept only as the measured alternative.
        state = self._real_token_bias(state)
        state = self._cache(state)
        check_finite(state)
        return state

    def _host_cache(self, state: CurvatureState) -> CurvatureState:
        """What `_cache` computes — each factor's eigenvalues (× the block's factor scale, clipped
        at 0) and eigenvectors, in kfac-jax's cache — with the eigendecompositions done by LAPACK
        on the host in float64 (`host_eigh`; factors on this process's devices). The measured
        alternative to the jitted cache (benchmarks/bench_eigh.py; slower on a 2-core CPU with
        jax 0.10.2); the results agree to float32 tolerance (tests/test_host_eigh.py)."""
        blocks = list(state.kfac.blocks_states)
        for b, (block, bstate) in enumerate(zip(self.estimator.blocks, blocks)):
            bstate = bstate.copy()
            n = len(bstate.factors)
            factor_scale = float(block.state_dependent_scale(bstate)) ** (1.0 / n)
            for i, factor in enumerate(bstate.factors):
                s, q = host_eigh(np.asarray(factor.value))
                for key, value in (
                    (f"{i}_factor_eigenvalues", factor_scale * s),
                    (f"{i}_factor_eigen_vectors", q),
                ):
                    old = bstate.cache[key]
                    bstate.cache[key] = jax.device_put(value.astype(old.dtype), old.sharding)
            blocks[b] = bstate
        return state.replace(kfac=dataclasses.replace(state.kfac, blocks_states=tuple(blocks)))

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


def host_eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues clipped at 0, eigenvectors) of a symmetric PSD factor, in float64 on the host
    (kfac-jax's safe_psd_eigh, computed by LAPACK's syevd through numpy); NaN in, NaN out."""
    a = np.asarray(a, np.float64)
    if not np.all(np.isfinite(a)):
        return np.full(a.shape[0], np.nan), np.full(a.shape, np.nan)
    s, q = np.linalg.eigh(a)
    return np.clip(s, 0.0, None), q


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


def factor_partition_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Rows over every mesh axis (data, fsdp, tensor) whose product divides them; rest replicated.

    Applied to the K-FAC factors, their eigenvectors and the EK-FAC correction (memory_plan.py's
    docstring says why rows over every device).
    """
    if len(shape) != 2:
        return PartitionSpec()
    return sharding.spec_for(
        ("factor_rows", None), shape, mesh, {"factor_rows": sharding.MESH_AXES}
    )


def state_shardings(state_like: Any, mesh: Mesh) -> Any:
    """NamedShardings for a CurvatureState: 2-D leaves row-sharded, everything else replicated."""
    return jax.tree.map(
        lambda a: NamedSharding(mesh, factor_partition_spec(a.shape, mesh)), state_like
    )


def place_state(state: CurvatureState, mesh: Mesh) -> CurvatureState:
    """The state row-sharded on `mesh`, every leaf its own buffer (kfac-jax's init may share
    one zeros buffer between leaves, which a donating update cannot take twice)."""
    copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s), out_shardings=state_shardings(state, mesh))
    return copy(state)


def params_mesh(params: Params) -> Mesh | None:
    """The mesh the parameters are placed on (None for single-device or unplaced arrays)."""
    leaf = jax.tree.leaves(params)[0]
    placed = getattr(leaf, "sharding", None)
    return placed.mesh if isinstance(placed, NamedSharding) else None


def accumulate_factors(
    curvature: KfacCurvature,
    params: Params,
    batches: Iterable[Batch],
    rng: jax.Array,
    state: CurvatureState | None = None,
) -> CurvatureState:
    """One streamed pass over `batches` → finalized (eigendecomposed) K-FAC state.

    Parameters placed on a mesh: the factors live row-sharded on it and each update donates the
    previous state (`KfacCurvature.update_fn`); otherwise the plain jitted update.
    """
    return accumulate_factors_keeping(curvature, params, batches, rng, 0, state)[0]


@dataclasses.dataclass
class KeptCaptures:
    """What the factor pass captured, batch by batch: [(captures, Σ batch weights)] (the EK-FAC
    correction's input, ekfac.correction_from_captures) and their size in bytes."""

    batches: list
    nbytes: int = 0


def accumulate_factors_keeping(
    curvature: KfacCurvature,
    params: Params,
    batches: Iterable[Batch],
    rng: jax.Array,
    keep_bytes: int,
    state: CurvatureState | None = None,
) -> tuple[CurvatureState, KeptCaptures | None]:
    """`accumulate_factors`, also keeping every batch's captures while they fit in `keep_bytes`
    (captured factor pass, empirical Fisher): the EK-FAC correction then needs no second model
    pass and equals the second pass's. Returns (state, None) when nothing is kept: keep_bytes 0,
    kfac-jax's own pass, the true Fisher, or captures that outgrew the budget (dropped as soon as
    they did, so memory never exceeds it by more than one batch).

    Not with sampled targets: Λ* from the very draws that gave A and G fits the sample's own
    eigenbasis — measured, the EK-FAC-preconditioned CG of the integration test no longer
    converged in 400 steps (4 of 4 seeds; 209–242 steps with fresh draws).
    """
    mesh, update = params_mesh(params), curvature.update
    keep = keep_bytes > 0 and curvature.captured_factors and curvature.mode == "empirical"
    kept = KeptCaptures([]) if keep else None
    for i, batch in enumerate(progress.bar(batches, "curvature factors")):
        if state is None:
            state = curvature.init(params, batch, rng)
            if mesh is not None:
                state = place_state(state, mesh)
                update = curvature.update_fn(mesh, state)
            if keep:
                update_keeping = curvature.keeping_update_fn(mesh, state)
        key = jax.random.fold_in(rng, i)
        if kept is None:
            state = update(state, params, batch, key)
            continue
        state, caught = update_keeping(state, params, batch, key)
        kept.nbytes += sum(x.nbytes + d.nbytes for x, d in caught.values())
        if kept.nbytes > keep_bytes:
            kept = None  # over budget: the correction makes its own pass
            continue
        kept.batches.append((caught, jnp.sum(batch["weights"].astype(jnp.float32))))
    if state is None:
        raise InputError("no batches for the curvature pass", field="data")
    return curvature.finalize(state), kept


@functools.lru_cache(maxsize=32)
def curvature_for(
    problem: CurvatureProblem, mode: str = "fisher", mesh: Mesh | None = None
) -> KfacCurvature:
    """One KfacCurvature (and its jitted passes) per (problem, mode, mesh) for the process;
    `mesh`: the one the parameters are placed on (`params_mesh`), None for unplaced ones."""
    return KfacCurvature(problem, mode=mode, mesh=mesh)
