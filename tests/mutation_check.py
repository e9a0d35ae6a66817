"""Mutation check: break the method on purpose and confirm a unit- or integration-tier test fails.

    python tests/mutation_check.py            # every mutation
    python tests/mutation_check.py --only ekfac_multiplies,identity_operator

Each mutation replaces one exact piece of source (it must be found, or the check itself fails) in
a fresh copy of the committed tree (HEAD), runs the listed tests there — in the unit tier (the
default `python -m pytest`), then, if none failed, in the integration tier (`-m integration`) —
and reports whether and by which tier they caught it. The working tree is never modified. Not
collected by pytest (no test_ prefix). Last line: one JSON object name → tier that caught it
(or false).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, what it breaks, file, old, new, tests that must catch it)
MUTATIONS = [
    (
        "keep_total_rescale",
        "(g) the paper step then a keep-total rescale (step below m)",
        "ideal_jax/reweight.py",
        "d = direction(alpha_j, sizes, cfg.keep_total)",
        "d = direction(alpha_j, sizes, False)",
        ["tests/test_reweight.py"],
    ),
    (
        "nominal_beta_recorded",
        "(g) the nominal β recorded instead of the applied one",
        "ideal_jax/reweight.py",
        "return self.volumes_after / before - 1.0",
        "return self.beta_nominal",
        ["tests/test_reweight.py"],
    ),
    (
        "summary_records_nominal",
        "summary.json rows[K].beta is the nominal β",
        "ideal_jax/round.py",
        "beta=dict(zip(names, the_step.beta_applied.tolist())),",
        "beta=dict(zip(names, the_step.beta_nominal.tolist())),",
        ["tests/test_cli.py::test_each_step_is_applied_as_computed_and_recorded_as_applied"],
    ),
    (
        "redraw_from_source",
        "D_k+1 redrawn from the sources with a new seed (not nested in D_k)",
        "ideal_jax/round.py",
        "next_mix = mixture_lib.resample_from(\n"
        "        base_mix,\n"
        "        the_step.volumes_after,\n"
        "        seed=cfg.seed + k + 1,\n"
        "        beta_nominal=the_step.beta_nominal,\n"
        "        pools=run.pools if base_mix.pool_sizes else None,\n"
        "        upsample=cfg.data.upsample,\n"
        "    )",
        "next_mix = mixture_lib.build_mixture({n: [t.example_id for t in run.suite.tokenized[n]] "
        "for n in mix.domain_names}, list(the_step.volumes_after / np.asarray(mix.source_sizes) "
        "- 1), seed=cfg.seed + k + 1, keep_total=True)",
        ["tests/test_cli.py::test_each_step_is_applied_as_computed_and_recorded_as_applied"],
    ),
    (
        "ignore_multiplicity",
        "(f) σ-subsample over distinct examples, ignoring the mixture's repeats",
        "ideal_jax/influence/stage.py",
        "return mixture_lib.materialize(mix, suite.tokenized)",
        "return list({t.example_id: t for t in mixture_lib.materialize(mix, suite.tokenized)}"
        ".values())",
        ["tests/test_mixture.py"],
    ),
    (
        "bias_counts_padding",
        "K-FAC bias entry of the input factor counts padding rows",
        "ideal_jax/curvature/kfac.py",
        "state = self._real_token_bias(state)\n        state = self._cache(state)",
        "state = self._cache(state)",
        ["tests/test_curvature_exactness.py"],
    ),
    (
        "token_weighted_all_row",
        "the 'all' reference row token-weighted by default",
        "ideal_jax/influence/alpha.py",
        'if reference_weighting == "capability":',
        'if reference_weighting == "never":',
        ["tests/test_alpha_rows.py"],
    ),
    (
        "optax_raw_alpha",
        "the optax rule fed raw α (not scale-free)",
        "ideal_jax/reweight.py",
        "g = -d / scale if scale > 0 else np.zeros_like(d)",
        "g = -d",
        ["tests/test_reweight.py"],
    ),
    (
        "optax_state_restarts",
        "the optax state restarts every round",
        "ideal_jax/round.py",
        "    base_opt_state = state.optimizer_state\n",
        "    base_opt_state = None\n",
        ["tests/test_round_state.py"],
    ),
    (
        "ekfac_multiplies",
        "(a) EK-FAC multiplies by the eigenvalues instead of dividing",
        "ideal_jax/curvature/ekfac.py",
        "rotated / (correction[path] + damping[path])",
        "rotated * (correction[path] + damping[path])",
        ["tests/test_curvature_exactness.py", "tests/test_known_answer_preconditioning.py"],
    ),
    (
        "ekfac_transposed_bases",
        "(b) transposed eigenbases in the EK-FAC inverse",
        "ideal_jax/curvature/ekfac.py",
        "rotated = qa.T @ v_ao @ qg\n",
        "rotated = qa @ v_ao @ qg.T\n",
        ["tests/test_curvature_exactness.py", "tests/test_known_answer_preconditioning.py"],
    ),
    (
        "identity_operator",
        "(c) the identity operator where the Hessian matters",
        "ideal_jax/curvature/operators.py",
        'if name == "identity":',
        'if name in ("identity", "kfac", "ekfac"):',
        ["tests/test_known_answer_preconditioning.py"],
    ),
    (
        "drop_training_gradient",
        "(d) 'exact' scaling without the −∇L̄_tr term",
        "ideal_jax/influence/alpha.py",
        "domain_grads = [jax.tree.map(jnp.subtract, g, g_tr) for g in domain_grads]",
        "domain_grads = list(domain_grads)",
        ["tests/test_alpha_rows.py"],
    ),
    (
        "wrong_kfac_scale",
        "(e) a wrong K-FAC scale factor (real-token ratio dropped)",
        "ideal_jax/curvature/kfac.py",
        "return (self.rows / jnp.maximum(self.tokens, 1.0)) * (",
        "return 1.0 * (",
        ["tests/test_curvature_exactness.py"],
    ),
    (
        "outer_q_constant",
        "the outer objective evaluated at θ* whatever the proportions (Q constant in w)",
        "ideal_jax/influence/outer_objective.py",
        "    dw_j = jnp.asarray(w_j, jnp.float32) - jnp.asarray(problem.proportions, jnp.float32)",
        "    dw_j = 0.0 * jnp.asarray(w_j, jnp.float32)",
        ["tests/test_outer_objective_lm.py", "tests/test_outer_rule_known_answer.py"],
    ),
    (
        "outer_accepts_every_step",
        "the outer rule accepts steps that raise Q (no step-length control)",
        "ideal_jax/influence/outer_objective.py",
        "better = q_w < q_z",
        "better = q_w == q_w",
        ["tests/test_outer_objective_lm.py", "tests/test_outer_rule_known_answer.py"],
    ),
    (
        "enum_not_validated",
        "an estimator that does not exist accepted at config load",
        "ideal_jax/configlib/checks.py",
        '"curvature.estimator": ("empirical", "fisher", "ggn_exact"),',
        '"curvature.estimator": ("empirical", "fisher", "ggn_exact", "sampled"),',
        ["tests/test_cli.py", "tests/test_configs.py"],
    ),
    (
        "checkpoint_not_verified",
        "checkpoint digests not checked on restore (a bit flip restores silently)",
        "ideal_jax/train/checkpoint.py",
        "            problem = self.verify(step)\n",
        "            problem = None\n",
        [
            "tests/test_train_loop.py::test_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one"
        ],
    ),
    (
        "checkpoint_no_fallback",
        "an unreadable latest checkpoint is not set aside (raw orbax error)",
        "ideal_jax/train/checkpoint.py",
        "            except Exception as e:  # orbax: truncated, unreadable or inconsistent files",
        "            except KeyboardInterrupt as e:  # mutated",
        [
            "tests/test_train_loop.py::test_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one"
        ],
    ),
    (
        "provenance_sha_ignored",
        "a hand-edited artifact is trusted (its content digest not checked)",
        "ideal_jax/provenance.py",
        'if entry.get("sha256") is not None and entry["sha256"] != _content_sha(path):',
        "if False:",
        # (a rerun's whole-workdir digest check, provenance.check_unmodified, also catches a hand
        # edit through the CLI, so the per-artifact guard is tested on its own)
        ["tests/test_provenance_check.py::test_a_hand_edited_artifact_is_not_trusted"],
    ),
    (
        "provenance_inputs_ignored",
        "artifacts reused whatever config and data produced them",
        "ideal_jax/provenance.py",
        "    if changed:\n        raise InputError(",
        "    if False:\n        raise InputError(",
        [
            "tests/test_cli.py::test_deleting_config_json_does_not_let_another_config_reuse_artifacts",
            "tests/test_cli.py::test_edited_training_data_is_detected",
        ],
    ),
    (
        "hold_ignored",
        "hold_indistinguishable moves domains whose α is within noise anyway",
        "ideal_jax/reweight.py",
        "        held = np.abs(np.asarray(alpha_j)) < cfg.significance_z * np.asarray(stderr_j)",
        "        held = np.zeros(len(sizes), bool)",
        ["tests/test_reweight.py"],
    ),
    (
        "default_estimator_empirical",
        "default estimator switched back to the empirical Fisher",
        "configs/common.py",
        'cfg.curvature.estimator = "fisher"',
        'cfg.curvature.estimator = "empirical"',
        ["tests/test_influence_accuracy.py"],
    ),
    (
        "compare_unpaired",
        "compare: differences to D0 taken between seed means, not paired per seed",
        "ideal_jax/stats.py",
        "diffs = [float(a) - float(b) for a, b in zip(values, baseline)]",
        "diffs = [float(a) - float(np.mean(baseline)) for a in values]",
        ["tests/test_compare_stats.py"],
    ),
    (
        "compare_normal_quantile",
        "compare: 95% CI with the normal quantile instead of Student's t (too narrow, 5 seeds)",
        "ideal_jax/stats.py",
        "if df <= len(_T975):\n        return _T975[df - 1]",
        "if df <= len(_T975):\n        return 1.959963984540054",
        ["tests/test_compare_stats.py"],
    ),
    (
        "compare_random_worst",
        "compare: 'Random (best)' picks the highest reference loss",
        "ideal_jax/compare/methods.py",
        'best = int(np.argmin([r["reference_loss"] for r in runs]))',
        'best = int(np.argmax([r["reference_loss"] for r in runs]))',
        [
            "tests/test_compare.py::test_random_is_chosen_on_dev_and_reported_from_a_fresh_training_seed"
        ],
    ),
    (
        "compare_weights_ignored",
        "compare: baseline proportions applied to the source volumes (w·n_j, not w·N)",
        "ideal_jax/compare/baselines.py",
        "beta = w * total / sizes - 1.0",
        "beta = w - 1.0",
        ["tests/test_compare_stats.py"],
    ),
    (
        "single_seed_silent",
        "a single-seed ideal table no longer says it cannot separate effect from noise",
        "ideal_jax/summary.py",
        '"one seed: round-to-round differences here cannot be separated from training noise "',
        '"one seed "',
        ["tests/test_compare_stats.py"],
    ),
    (
        "slurm_per_node_as_per_gpu",
        "a one-task-per-node SLURM job left to JAX's one-GPU-per-task detection",
        "ideal_jax/utils/distributed.py",
        'return "slurm_per_node" if slurm_tasks_per_node(env) == 1 else "slurm"',
        'return "slurm"',
        ["tests/test_distributed.py"],
    ),
    (
        "tpu_needs_hostnames",
        "a TPU VM slice without TPU_WORKER_HOSTNAMES started as a single process",
        "ideal_jax/utils/distributed.py",
        'endpoints = metadata("worker-network-endpoints") or ""',
        'endpoints = ""',
        ["tests/test_distributed.py"],
    ),
    (
        "plan_lowers_its_own_jit",
        "memory_plan lowers a jit of its own, not the factor update the influence stage runs",
        "ideal_jax/curvature/memory_plan.py",
        "update = curvature.update_fn(mesh, abstract_state)",
        "update = jax.jit(curvature.update, donate_argnums=0)",
        ["tests/test_curvature_placement.py"],
    ),
    (
        "factor_state_not_donated",
        "the placed factor update copies the state instead of updating it in place",
        "ideal_jax/curvature/kfac.py",
        "                out_shardings=state_sh,\n                donate_argnums=0,\n",
        "                out_shardings=state_sh,\n",
        ["tests/test_curvature_placement.py"],
    ),
    (
        "curvature_batch_unchecked",
        "a curvature batch over the device's plan goes ahead (OOM mid-pass instead of exit 2)",
        "ideal_jax/influence/stage.py",
        "    if memory is not None:  # a batch that does not fit",
        "    if False:  # a batch that does not fit",
        ["tests/test_memory_plan.py"],
    ),
    (
        "activation_scores_dropped",
        "the curvature-batch plan ignores the dense attention scores",
        "ideal_jax/curvature/batch_plan.py",
        "2 * c.num_heads * seq_len / t + ",
        "",
        ["tests/test_memory_plan.py"],
    ),
    (
        "stage_fingerprint_whole_config",
        "artifacts fingerprinted over the whole config (a DaaR field invalidates IDEAL rounds)",
        "ideal_jax/provenance.py",
        'if (k == section or k.startswith(section + "."))',
        "if True",
        ["tests/test_config_evolution.py"],
    ),
    (
        "added_field_refused",
        "a field added to the package later (at its default) refuses every existing workdir",
        "ideal_jax/configlib/workdir.py",
        "and not (k not in old and k in defaults and new.get(k) == defaults[k])",
        "and True",
        ["tests/test_config_evolution.py"],
    ),
    (
        "state_drops_optimizer",
        "the saved round state loses the reweight optimizer state on resume",
        "ideal_jax/round.py",
        'optimizer_state=obj.get("optimizer_state"),',
        "optimizer_state=None,",
        ["tests/test_round_state.py"],
    ),
    (
        "resume_reruns_rounds",
        "finished rounds run again on resume (the round-level resume wrapper ignored)",
        "ideal_jax/ideal.py",
        "    if os.path.exists(row_path):",
        "    if False:",
        ["tests/test_round_state.py"],
    ),
    (
        "cap_first_n",
        "data.max_examples_per_domain keeps the first N records (sorted files lose topics)",
        "ideal_jax/data/suite.py",
        "out[name] = [examples[i] for i in sorted(keep)]",
        "out[name] = examples[:max_examples]",
        ["tests/test_data_cap.py"],
    ),
    (
        "cap_ignored",
        "load_suite ignores data.max_examples_per_domain",
        "ideal_jax/data/suite.py",
        "    domains = cap_domains(domains, data.max_examples_per_domain, seed=cfg.seed)\n",
        "",
        ["tests/test_data_cap.py"],
    ),
    (
        "eval_limit_per_capability_ignored",
        "an evaluation task's limit_per_capability is ignored (every item is scored)",
        "ideal_jax/evaluate/runner.py",
        '    recs = limit_per_capability(recs, cfg.get("limit_per_capability"))\n',
        "",
        ["tests/test_eval_runner.py"],
    ),
    (
        "activations_unpinned",
        "the model's residual stream is not pinned to rows (the embedding table not gathered)",
        "ideal_jax/model/transformer.py",
        'table_vd = sharding.constrain_spec(model.embed_tokens[...], ("vocab", None))',
        "table_vd = model.embed_tokens[...]",
        ["tests/test_activation_sharding.py"],
    ),
    (
        "kfac_loss_outside_mesh",
        "kfac-jax's loss traced without the activation mesh (token rows laid out like factors)",
        "ideal_jax/curvature/kfac.py",
        "with sharding.activation_mesh(self.mesh):  # activations pinned to rows on the mesh",
        "with sharding.activation_mesh(None):",
        ["tests/test_activation_sharding.py"],
    ),
    (
        "captured_factors_outside_mesh",
        "the captured factor pass traced without the activation mesh",
        "ideal_jax/curvature/kfac.py",
        "with sharding.activation_mesh(self.mesh):\n            _, caught = captures",
        "with sharding.activation_mesh(None):\n            _, caught = captures",
        ["tests/test_activation_sharding.py"],
    ),
    (
        "prefix_skips_a_layer",
        "the forward from a kept hidden state skips a decoder layer",
        "ideal_jax/model/transformer.py",
        "layers = list(model.layers)[start_layer:end]",
        "layers = list(model.layers)[start_layer + (start_layer > 0) : end]",
        ["tests/test_prefix_cache.py"],
    ),
    (
        "prefix_from_the_wrong_layer",
        "the stage keeps the hidden state leaving the layer the passes start at",
        "ideal_jax/influence/stage.py",
        "problem_lib.with_prefix_hidden(self.model_cfg, self.params, b, self.start, self.mesh)",
        "problem_lib.with_prefix_hidden(self.model_cfg, self.params, b, self.start + 1, self.mesh)",
        ["tests/test_prefix_cache.py"],
    ),
    (
        "head_rows_gathered_twice",
        "logits already at the loss rows are gathered again at those positions",
        "ideal_jax/curvature/problem.py",
        "    if not problem.outputs_at_loss_positions:\n        outputs = batching.at_loss_positions",
        "    if True:\n        outputs = batching.at_loss_positions",
        ["tests/test_smollm2_loss_rows.py"],
    ),
    (
        "pcg_direction_unpreconditioned",
        "preconditioned CG steps along the residual instead of the preconditioned residual",
        "ideal_jax/curvature/exact.py",
        "d = xp.where(active[:, None], z + beta[:, None] * d, d)",
        "d = xp.where(active[:, None], r + beta[:, None] * d, d)",
        [
            "tests/test_cg_preconditioning.py::test_preconditioned_cg_block_reaches_exact_block_in_a_fraction_of_plain_cg_steps"
        ],
    ),
    (
        "cg_block_keeps_cross_layer_blocks",
        "cg_block solves the whole GGN (cross-layer blocks kept) instead of exact_block",
        "ideal_jax/curvature/operators.py",
        'blocks = [problem.layers] if name == "cg" else [(p,) for p in problem.layers]',
        "blocks = [problem.layers]",
        [
            "tests/test_cg_preconditioning.py::test_preconditioned_cg_block_reaches_exact_block_in_a_fraction_of_plain_cg_steps"
        ],
    ),
    (
        "cg_preconditioner_is_identity",
        "the CG preconditioner returns its input (no K-FAC / EK-FAC inverse)",
        "ideal_jax/curvature/operators.py",
        "out = precondition({**zeros, **v}, lam_all)",
        "out = {**zeros, **v}",
        [
            "tests/test_cg_preconditioning.py::test_preconditioned_cg_block_reaches_exact_block_in_a_fraction_of_plain_cg_steps"
        ],
    ),
    (
        "stage_skips_cg_preconditioner_state",
        "the influence stage fits no K-FAC / EK-FAC state for a preconditioned cg_block",
        "ideal_jax/influence/stage.py",
        'fitted = infl.cg_preconditioner if infl.operator.startswith("cg") else infl.operator',
        "fitted = infl.operator",
        [
            "tests/test_cg_preconditioning.py::test_the_stage_fits_the_preconditioner_and_records_the_solve"
        ],
    ),
    (
        "unverified_checkpoint_failure_not_set_aside",
        "an undigested checkpoint whose restore fails stops the run instead of falling back",
        "ideal_jax/train/checkpoint.py",
        "except Exception as e:  # orbax: truncated, unreadable or inconsistent files",
        "except KeyError as e:  # orbax: truncated, unreadable or inconsistent files",
        [
            "tests/test_train_loop.py::test_damaged_latest_checkpoint_falls_back_to_the_newest_valid_one"
        ],
    ),
]


# Rows added with the test tiers, the honest comparison and the step policy (issues 23-25).
MUTATIONS += [
    (
        "benchmark_stale_import",
        "a benchmark imports a module that moved (ideal_jax.compare.stats)",
        "benchmarks/demo_volume_curves.py",
        "from ideal_jax import main, stats  # noqa: E402\n",
        "from ideal_jax import main  # noqa: E402\n"
        "from ideal_jax.compare import stats  # noqa: E402\n",
        ["tests/test_benchmark_scripts.py::test_benchmark_imports_and_parses_help"],
    ),
    (
        "benchmark_exits_before_parsing",
        "a benchmark exits at import (optional package missing) before argparse sees --help",
        "benchmarks/bench_vs_kronfluence.py",
        'MLP = ("gate_proj", "up_proj", "down_proj")\n',
        'if not kronfluence_ref.available():\n    sys.exit(0)\n\nMLP = ("gate_proj", "up_proj", '
        '"down_proj")\n',
        ["tests/test_benchmark_scripts.py::test_benchmark_imports_and_parses_help"],
    ),
    (
        "error_names_curvature_operator",
        "an error names curvature.operator (the field is influence.operator)",
        "ideal_jax/curvature/operators.py",
        'f"unknown inverse operator {name!r}; one of {OPERATORS}", field="influence.operator"',
        'f"unknown inverse operator {name!r}; one of {OPERATORS}", field="curvature.operator"',
        ["tests/test_error_field_names.py::test_every_config_field_an_error_names_exists"],
    ),
    (
        "error_message_names_missing_field",
        "a located message tells the user to set train.lr, which does not exist",
        "ideal_jax/train/loop.py",
        '"train.learning_rate (or raise warmup_steps) and use a new --workdir"',
        '"train.lr (or raise warmup_steps) and use a new --workdir"',
        ["tests/test_error_field_names.py::test_every_config_field_an_error_names_exists"],
    ),
    (
        "error_fstring_field_wrong_section",
        "an f-string field names daar.taus.<domain> (no such field)",
        "ideal_jax/daar/config.py",
        'field=f"daar.tau.{domain}"',
        'field=f"daar.taus.{domain}"',
        ["tests/test_error_field_names.py::test_every_config_field_an_error_names_exists"],
    ),
    (
        "progress_carriage_return_off_tty",
        "off a terminal the progress lines are carriage-return redraws",
        "ideal_jax/utils/progress.py",
        'self.fp.write(line + "\\n")',
        'self.fp.write("\\r" + line)',
        ["tests/test_progress.py"],
    ),
    (
        "progress_line_every_update",
        "off a terminal a line at every update (no interval)",
        "ideal_jax/utils/progress.py",
        "if now - self._last_line >= self.log_every:",
        "if True:",
        ["tests/test_progress.py::test_off_a_terminal_progress_is_a_line_at_most_every_n_seconds"],
    ),
    (
        "progress_lines_on_tty",
        "lines instead of a bar on a terminal too",
        "ideal_jax/utils/progress.py",
        "if not off and not _NOTEBOOK and not _is_terminal(stream):",
        "if not off and not _NOTEBOOK:",
        ["tests/test_progress.py::test_on_a_terminal_the_bar_is_tqdm_as_before"],
    ),
    (
        "upsample_always_repeats",
        "fresh_first ignored: a growing domain only repeats D_k's entries",
        "ideal_jax/data/mixture.py",
        'if upsample == "fresh_first" and volume > n and name in pool_of:',
        "if False:",
        ["tests/test_pools_and_budget.py"],
    ),
    (
        "fresh_before_repeat_order",
        "fresh_first takes one example fewer than it could and repeats instead",
        "ideal_jax/data/mixture.py",
        "take = min(volume - n, len(unused))",
        "take = max(min(volume - n, len(unused)) - 1, 0)",
        ["tests/test_pools_and_budget.py"],
    ),
    (
        "demo_dev_rows_are_test_rows",
        "the demo's reference (dev) rows overlap its test rows",
        "ideal_jax/data/demo_suite.py",
        "test = order[: min(n_test, len(rows) - n_ref)]",
        "test = order[-min(n_test, len(rows)) :]",
        ["tests/test_pools_and_budget.py"],
    ),
    (
        "budget_ignored",
        "every mixture trains its own epoch length (the equal-steps budget ignored)",
        "ideal_jax/data/suite.py",
        "steps = own_steps if steps_per_epoch is None else int(steps_per_epoch)",
        "steps = own_steps",
        ["tests/test_pools_and_budget.py"],
    ),
    (
        "random_reports_its_selection_run",
        "random reports the selection run it was chosen from (same training seed)",
        "ideal_jax/compare/methods.py",
        "FRESH_TRAIN_SEED_OFFSET = 10_007",
        "FRESH_TRAIN_SEED_OFFSET = 0",
        [
            "tests/test_compare.py::test_random_is_chosen_on_dev_and_reported_from_a_fresh_training_seed"
        ],
    ),
    (
        "policy_reject_keeps_the_rejected_mixture",
        "a rejected round's step starts from the rejected mixture, not the incumbent",
        "ideal_jax/round.py",
        "base = k if decision.accepted else decision.incumbent",
        "base = k",
        ["tests/test_step_policy_loop.py"],
    ),
    (
        "policy_never_shrinks",
        "a rejected step is retried with the same step size",
        "ideal_jax/step_policy.py",
        "shorter = m * cfg.shrink",
        "shorter = m",
        ["tests/test_step_policy.py"],
    ),
    (
        "policy_accepts_ties",
        "an equal dev objective counts as an improvement",
        "ideal_jax/step_policy.py",
        "if objective < state.incumbent_objective:",
        "if objective <= state.incumbent_objective:",
        ["tests/test_step_policy.py"],
    ),
    (
        "policy_result_is_the_last_round",
        "the result is the last round, not the best accepted one",
        "ideal_jax/ideal.py",
        'return int(rows[-1].get("policy", {}).get("incumbent", rows[-1]["round"]))',
        'return int(rows[-1]["round"])',
        ["tests/test_step_policy_loop.py"],
    ),
    (
        "policy_prediction_nominal",
        "the recorded prediction uses the nominal β, not the step as applied",
        "ideal_jax/round.py",
        "predicted_change = float(np.dot(alpha_j, the_step.beta_applied))",
        "predicted_change = float(np.dot(alpha_j, the_step.beta_nominal))",
        ["tests/test_step_policy_loop.py"],
    ),
]


# Rows added with issue 27 (real users' data and machines).
MUTATIONS += [
    (
        "no_eval_table",
        "a run without eval tasks: format_table indexes an empty score row",
        "ideal_jax/summary.py",
        "    if not caps:\n        return _reference_loss_table(reference_loss or [])",
        "    if not caps and scores is None:\n        return _reference_loss_table(reference_loss or [])",
        ["tests/test_user_data_files.py::test_table_without_eval_tasks_shows_reference_losses"],
    ),
    (
        "plot_label_mathtext",
        "domain names reach matplotlib unescaped ($^$ is a mathtext error)",
        "ideal_jax/summary.py",
        '    text = label_text(name).replace("$", r"\\$")',
        "    text = label_text(name)",
        ["tests/test_user_data_files.py::test_odd_domain_name_in_summary_plot_and_table"],
    ),
    (
        "lone_surrogate_accepted",
        "text with a lone surrogate reaches the tokenizer",
        "ideal_jax/data/records.py",
        "    check_unicode(value, where=where, field=field)\n    return value",
        "    return value",
        ["tests/test_user_data_files.py::test_hostile_domain_file"],
    ),
    (
        "json_recursion_uncaught",
        "JSON nested deeper than the recursion limit: RecursionError traceback",
        "ideal_jax/data/sources.py",
        "    except RecursionError:",
        "    except ZeroDivisionError:",
        ["tests/test_user_data_files.py::test_hostile_domain_file"],
    ),
    (
        "bom_not_skipped",
        "a UTF-8 byte-order mark on line 1 is malformed JSON",
        "ideal_jax/data/sources.py",
        '                line = line.removeprefix("\\ufeff")  # a byte-order mark (Windows editors)',
        "                pass",
        ["tests/test_user_data_files.py::test_hostile_domain_file"],
    ),
    (
        "template_error_unnamed",
        "a chat template error is raised from inside the batch, no record named",
        "ideal_jax/data/formatting.py",
        '            except Exception as e:\n                detail = " ".join(str(e).split())[:200]',
        '            except Exception as e:\n                raise\n                detail = " ".join(str(e).split())[:200]',
        ["tests/test_user_data_files.py::test_a_template_error_names_the_record"],
    ),
    (
        "capability_all_accepted",
        "a capability named all beside others takes alpha's whole-set row name",
        "ideal_jax/data/domains.py",
        "    if ALL_ROW in grouped and len(grouped) > 1:",
        "    if False:",
        ["tests/test_user_data_files.py::test_capability_named_all_beside_others_is_refused"],
    ),
    (
        "negative_lr_accepted",
        "train.learning_rate has no range",
        "ideal_jax/configlib/checks.py",
        '        "train.learning_rate": (lambda v: v > 0, "> 0"),',
        '        "train.learning_rate": (lambda v: True, "> 0"),',
        ["tests/test_user_data_config.py::test_out_of_range_value_is_refused_before_the_workdir"],
    ),
    (
        "non_finite_accepted",
        "inf / nan pass the RANGES checks",
        "ideal_jax/configlib/checks.py",
        "            or not math.isfinite(value)\n",
        "",
        ["tests/test_user_data_config.py::test_out_of_range_value_is_refused_before_the_workdir"],
    ),
    (
        "mesh_fewer_devices_accepted",
        "a mesh using fewer devices than the machine has passes",
        "ideal_jax/configlib/machine.py",
        "    elif known != device_count:",
        "    elif known > device_count:",
        ["tests/test_user_data_config.py::test_mesh_that_does_not_fit_the_devices_is_refused"],
    ),
    (
        "mesh_not_checked",
        "main.check_config does not check the machine",
        "ideal_jax/main.py",
        "    check_machine(cfg, jax.device_count(), jax.process_count())",
        "    pass",
        ["tests/test_user_data_config.py::test_the_message_says_how_many_devices_there_are"],
    ),
    (
        "batch_divisor_unchecked",
        "a batch that does not split over data x fsdp passes",
        "ideal_jax/configlib/machine.py",
        "    if batch % accum or (batch // accum) % divisor:",
        "    if batch % accum:",
        ["tests/test_user_data_config.py::test_batch_that_does_not_split_over_the_mesh_is_refused"],
    ),
    (
        "paths_unchecked",
        "a missing data / model / tokenizer path passes the config check",
        "ideal_jax/configlib/machine.py",
        "        if isinstance(path, str) and path and not os.path.exists(path):",
        "        if False:",
        ["tests/test_user_data_config.py::test_missing_path_is_refused_before_the_workdir"],
    ),
    (
        "max_len_over_seq_len",
        "data.max_len > train.seq_len passes (a ValueError in batching later)",
        "ideal_jax/configlib/checks.py",
        "    if MISSING not in (max_len, seq_len) and max_len > seq_len:",
        "    if MISSING not in (max_len, seq_len) and max_len > 4 * seq_len:",
        ["tests/test_user_data_config.py::test_max_len_longer_than_a_training_row_is_refused"],
    ),
    (
        "disk_full_traceback",
        "orbax's RESOURCE_EXHAUSTED No space left is not recognised",
        "ideal_jax/utils/errors.py",
        '_NO_SPACE = ("No space left on device", "Disk quota exceeded", "os_error_code=\'28\'")',
        "_NO_SPACE = ()",
        ["tests/test_user_data_faults.py::test_a_full_disk_is_one_line_naming_the_path"],
    ),
    (
        "oom_called_disk_full",
        "a device out-of-memory RESOURCE_EXHAUSTED reported as a full disk",
        "ideal_jax/utils/errors.py",
        '_NO_SPACE = ("No space left on device",',
        '_NO_SPACE = ("RESOURCE_EXHAUSTED", "No space left on device",',
        ["tests/test_user_data_faults.py::test_a_bug_stays_a_traceback"],
    ),
    (
        "ctrl_c_traceback",
        "Ctrl-C is not turned into exit 130",
        "ideal_jax/main.py",
        "    if isinstance(error, KeyboardInterrupt):",
        "    if isinstance(error, ZeroDivisionError):",
        ["tests/test_user_data_faults.py::test_command_ends_with_one_error_line"],
    ),
    (
        "atomic_tmp_left",
        "a failed atomic write leaves its partial temporary file",
        "ideal_jax/utils/atomic.py",
        "        with contextlib.suppress(OSError):\n"
        "            if os.path.isdir(tmp) and not os.path.islink(tmp):\n"
        "                shutil.rmtree(tmp)\n"
        "            else:\n"
        "                os.remove(tmp)",
        "        pass",
        [
            "tests/test_user_data_faults.py::test_a_full_disk_during_an_atomic_write_keeps_the_old_file"
        ],
    ),
    (
        "safetensors_truncation_unchecked",
        "a truncated safetensors file opens (reshape error later)",
        "ideal_jax/model/hf_io.py",
        "        if self.offset + end > size:",
        "        if False:",
        ["tests/test_user_data_model.py::test_truncation_names_the_first_tensor_cut"],
    ),
    (
        "tokenizer_dir_unchecked",
        "a model directory without tokenizer files goes to transformers",
        "ideal_jax/model/hf_io.py",
        "    if not present:",
        "    if False:",
        ["tests/test_user_data_model.py::test_model_directory_without_a_tokenizer_is_named"],
    ),
    (
        "fewer_rounds_allowed",
        "a finished workdir rerun with fewer rounds rewrites its outputs",
        "ideal_jax/provenance.py",
        "    if last > rounds or stepped:",
        "    if False:",
        ["tests/test_user_data_rerun.py::test_fewer_rounds_than_the_workdir_holds_is_refused"],
    ),
    (
        "edited_artifact_trusted",
        "a rerun does not check the recorded digests",
        "ideal_jax/main.py",
        "        provenance.check_unmodified(workdir)",
        "        pass",
        ["tests/test_user_data_rerun.py::test_an_edited_artifact_of_a_finished_workdir_is_refused"],
    ),
]


# Rows added with issue 29 (fine-tuning types: full | freeze | lora).
MUTATIONS += [
    (
        "freeze_trains_all_layers",
        "freeze: every decoder layer is trainable (frozen layers move)",
        "ideal_jax/train/finetuning.py",
        'len(path) > 1 and path[0] == "layers" and int(path[1]) >= self.first_trained_layer',
        'len(path) > 1 and path[0] == "layers"',
        [
            "tests/test_finetuning_freeze.py::"
            "test_frozen_parameters_are_bit_identical_and_top_layer_trains"
        ],
    ),
    (
        "prefix_key_ignores_tokens",
        "the prefix cache keys an example by its positions only (another example's entry)",
        "ideal_jax/train/prefix_cache.py",
        "np.ascontiguousarray(tokens[b, cols], np.int32).tobytes()\n                + ",
        "",
        ["tests/test_finetuning_freeze.py::test_cached_prefix_equals_recomputation"],
    ),
    (
        "prefix_key_ignores_params",
        "the prefix cache's namespace ignores the frozen parameters' values (stale entries)",
        "ideal_jax/train/prefix_cache.py",
        "digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())",
        'digest.update(b"")',
        ["tests/test_finetuning_freeze.py::test_prefix_cache_is_keyed_by_the_frozen_parameters"],
    ),
    (
        "prefix_cache_not_shared_by_rounds",
        "freeze: each training keeps its prefix entries to itself (no directory at the run root)",
        "ideal_jax/train/stage.py",
        "prefix_cache_dir=prefix_cache_dir(train_cfg, rdir),",
        "prefix_cache_dir=None,",
        ["tests/test_finetuning_cli.py::test_freeze_prefix_cache_is_reused_by_the_next_round"],
    ),
    (
        "freeze_resume_replays_nothing_skipped",
        "a resumed freeze run does not skip the batches it already trained on",
        "ideal_jax/train/loop.py",
        "skip = max(start_step - epoch * steps_per_epoch, 0)",
        "skip = 0",
        ["tests/test_finetuning_freeze.py::test_resume_after_exception_is_exact"],
    ),
    (
        "freeze_curvature_over_all_layers",
        "freeze: the run's curvature layers keep the preset over every layer (frozen ones too)",
        "ideal_jax/ideal.py",
        '"cfg": trained.with_trained_curvature_layers(cfg),  # freeze: influence over them',
        '"cfg": cfg,',
        [
            "tests/test_finetuning_config.py::test_freeze_curvature_layers_default_to_the_trained_layers",
            "tests/test_finetuning_cli.py::test_freeze_influence_is_over_the_trained_layers_only",
        ],
    ),
    (
        "lora_b_not_zero",
        "LoRA's B is initialised at random (a fresh adapter changes the model)",
        "ideal_jax/model/lora.py",
        "            out.append(jnp.zeros(shape.shape, jnp.float32))",
        "            out.append(jax.random.uniform(k, shape.shape, jnp.float32, -0.1, 0.1))",
        ["tests/test_finetuning_lora.py::test_zero_initialised_adapters_leave_logits_unchanged"],
    ),
    (
        "lora_scale_ignored",
        "the forward adds (x A) B without the alpha / r scale",
        "ideal_jax/model/transformer.py",
        "return (kfac_tags.lora_scale.astype(dtype) * v).astype(dtype)",
        "return v.astype(dtype)",
        ["tests/test_finetuning_lora.py::test_adapters_change_the_logits_by_scale_x_a_b"],
    ),
    (
        "lora_base_trained",
        "LoRA trains the base weights too (everything but the scale)",
        "ideal_jax/train/finetuning.py",
        'return len(path) > 1 and path[0] == LORA_KEY and path[1] == "layers"',
        'return not (len(path) > 1 and path[0] == LORA_KEY and path[1] == "scale")',
        ["tests/test_finetuning_lora.py::test_lora_trains_only_the_adapters"],
    ),
    (
        "lora_export_unmerged",
        "the exported model is the base model (adapters dropped)",
        "ideal_jax/export.py",
        "restored = lora.merge_host(restore_params_only(directory))",
        "restored = restore_params_only(directory)",
        [
            "tests/test_finetuning_lora.py::"
            "test_merged_export_equals_the_adapted_model_in_transformers"
        ],
    ),
    (
        "lora_tags_misnamed",
        "adapter matmuls tagged under the base layer's name (K-FAC blocks not over the adapters)",
        "ideal_jax/model/transformer.py",
        'name = f"{LORA_KEY}.{self.path}"',
        "name = self.path",
        [
            "tests/test_finetuning_lora_influence.py::"
            "test_kfac_and_ekfac_over_adapters_match_the_exact_damped_curvature"
        ],
    ),
    (
        "lora_base_layers_as_curvature",
        "curvature layers over a LoRA model's frozen base weights pass",
        "ideal_jax/curvature/layers.py",
        '    if adapters and any(not p.startswith("lora.") for p in chosen):',
        "    if False:",
        ["tests/test_finetuning_lora_influence.py::test_base_layers_of_a_lora_model_are_refused"],
    ),
    (
        "lora_curvature_over_base",
        "LoRA: the curvature preset keeps the base projections (influence over frozen weights)",
        "ideal_jax/curvature/trained.py",
        'f"(?:{p})" if p.startswith("lora") else rf"(?:lora\\.{p}\\.lora_[ab])"',
        'f"(?:{p})"',
        [
            "tests/test_finetuning_config.py::"
            "test_lora_curvature_layers_are_the_adapters_of_the_preset",
            "tests/test_finetuning_cli.py::test_lora_ideal_run_computes_influence_over_the_adapters",
        ],
    ),
    (
        "lora_eval_of_base_model",
        "LoRA: evaluation drops the adapters (scores of the base model)",
        "ideal_jax/evaluate/stage.py",
        "    params = lora.merge(params)  # train.finetuning = lora: the adapted model as plain weights",
        '    params = {k: v for k, v in params.items() if k != "lora"}',
        ["tests/test_finetuning_cli.py::test_lora_ideal_run_computes_influence_over_the_adapters"],
    ),
    (
        "finetuning_layers_from_preset",
        "N and the adapters are checked against the preset, not model.path's checkpoint",
        "ideal_jax/train/finetuning.py",
        '    if model_section.get("path"):',
        "    if False:",
        ["tests/test_finetuning_config.py::test_freeze_layers_are_counted_from_the_checkpoint"],
    ),
    (
        "freeze_layers_unbounded",
        "train.freeze_trainable_layers above the model's layers passes",
        "ideal_jax/train/finetuning.py",
        "not 1 <= n <= num_layers:",
        "not 1 <= n:",
        ["tests/test_finetuning_config.py::test_bad_finetuning_fields_exit_2_naming_the_field"],
    ),
    (
        "lora_targets_unchecked",
        "a LoRA target that names no projection passes",
        "ideal_jax/train/finetuning.py",
        "    if unknown or not targets:",
        "    if not targets:",
        ["tests/test_finetuning_config.py::test_bad_finetuning_fields_exit_2_naming_the_field"],
    ),
    (
        "lora_rank_unchecked",
        "train.lora_rank <= 0 passes",
        "ideal_jax/train/finetuning.py",
        "or not isinstance(rank, int) or rank <= 0:",
        "or not isinstance(rank, int):",
        ["tests/test_finetuning_config.py::test_bad_finetuning_fields_exit_2_naming_the_field"],
    ),
    (
        "finetuning_not_checked",
        "main.check_config does not check train.finetuning's fields",
        "ideal_jax/main.py",
        "    trained.check_config(cfg)  # train.finetuning's fields against the model's layers",
        "    pass",
        ["tests/test_finetuning_config.py::test_bad_finetuning_fields_exit_2_naming_the_field"],
    ),
]

# Issue 28: the α-error subsample budget, host eigendecompositions, CG on the host.
MUTATIONS += [
    (
        "alpha_se_grows_resolved_domains",
        "the α-error budget doubles every domain, resolved ones too",
        "ideal_jax/influence/stage.py",
        "want = [min(2 * n, plan.cap[j]) if j in grow else n for j, n in enumerate(sizes)]",
        "want = [min(2 * n, plan.cap[j]) for j, n in enumerate(sizes)]",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "alpha_se_target_ignored",
        "the α-error budget stops after its first stage whatever the standard errors",
        "ideal_jax/influence/stage.py",
        "resolved = np.isfinite(se_j) & (se_j <= plan.target * scale)",
        "resolved = np.isfinite(se_j) | (se_j <= plan.target * scale)",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "alpha_se_curvature_not_prefix",
        "the curvature passes' sample is not the first stage's examples (not a prefix of the order)",
        "ideal_jax/influence/stage.py",
        "curvature_items = [t for b, k in zip(by_domain, counts) for t in b[:k]]",
        "curvature_items = [t for b, k in zip(by_domain, counts) for t in b[len(b) - k :]]",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "alpha_se_stage_rereads",
        "each stage re-reads the domain's earlier examples (counted twice)",
        "ideal_jax/influence/stage.py",
        "chosen = [plan.by_domain[j][a:b] for j, (a, b) in enumerate(ranges)]",
        "chosen = [plan.by_domain[j][0:b] for j, (a, b) in enumerate(ranges)]",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "alpha_from_terms_uncentred",
        "α from the per-example terms, exact scaling, without the training-gradient term",
        "ideal_jax/influence/alpha.py",
        "return f[None] * (m - (m * f[None]).sum(axis=1, keepdims=True))",
        "return f[None] * m",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "host_eigh_transposed",
        "host eigendecomposition returns Qᵀ for Q",
        "ideal_jax/curvature/kfac.py",
        "return np.clip(s, 0.0, None), q",
        "return np.clip(s, 0.0, None), q.T",
        ["tests/test_host_eigh.py"],
    ),
    (
        "operator_damping_library_default",
        "build_operator keeps its own default damping (a second home beside configs/common.py)",
        "ideal_jax/curvature/operators.py",
        "    damping: float | None = None,\n    relative_damping: bool | None = None,",
        "    damping: float | None = 0.1,\n    relative_damping: bool | None = True,",
        ["tests/test_operator_inputs.py"],
    ),
    (
        "cg_host_beta_uses_rr",
        "preconditioned CG on the host: β from r·r instead of r·z",
        "ideal_jax/curvature/exact.py",
        "beta = xp.where(active, rz_new / xp.where(active, rz, 1.0), 0.0)",
        "beta = xp.where(active, rz_new / xp.where(active, rr, 1.0), 0.0)",
        ["tests/test_cg_preconditioning.py"],
    ),
    (
        "rotation_plan_sides_swapped",
        "EK-FAC correction: each side's rows-or-gradient rotation chosen by the other side's rule",
        "ideal_jax/curvature/ekfac.py",
        "    return t <= o, t <= i\n",
        "    return t <= i, t <= o\n",
        ["tests/test_influence_pass_orders.py"],
    ),
    (
        "correction_left_basis_transposed",
        "EK-FAC correction: Q_A (not Q_Aᵀ) applied to a formed per-example gradient",
        "ideal_jax/curvature/ekfac.py",
        "            g_io = qa.T @ g_io\n",
        "            g_io = qa @ g_io\n",
        ["tests/test_influence_pass_orders.py"],
    ),
    (
        "correction_output_rows_unrotated",
        "EK-FAC correction: output-gradient rows left unrotated when the plan rotates them",
        "ideal_jax/curvature/ekfac.py",
        "        d_bto = (d_bto.reshape(b * t, o) @ qg).reshape(b, t, o)\n",
        "        d_bto = d_bto\n",
        ["tests/test_influence_pass_orders.py"],
    ),
    (
        "score_batch_gradient_last_example",
        "per-example scores: the batch gradient keeps only the last example's",
        "ideal_jax/influence/per_example.py",
        "        return g_io + g, -(v_rk @ g.reshape(i * o))\n",
        "        return g, -(v_rk @ g.reshape(i * o))\n",
        ["tests/test_influence_pass_orders.py"],
    ),
    (
        "score_dot_unnegated",
        "per-example scores: +⟨∇ℓ_n, H⁻¹g⟩ instead of −",
        "ideal_jax/influence/per_example.py",
        "        return g_io + g, -(v_rk @ g.reshape(i * o))\n",
        "        return g_io + g, (v_rk @ g.reshape(i * o))\n",
        ["tests/test_influence_pass_orders.py"],
    ),
]


# Session 9: training's loss at the loss rows, the freeze prefix cache shared by the run.
MUTATIONS += [
    (
        "train_loss_rows_filler_counted",
        "training's loss at K loss rows counts the filler slots (they point at position 0)",
        "ideal_jax/train/step.py",
        "weights, domains = jnp.where(valid, weights, 0.0), jnp.where(valid, domains, -1)",
        "weights, domains = weights, jnp.where(valid, domains, -1)",
        ["tests/test_train_loss_rows.py"],
    ),
    (
        "train_loss_rows_bound_too_small",
        "K from the smallest weighted fraction of an example, not the largest",
        "ideal_jax/data/batching.py",
        "    frac = max(\n",
        "    frac = min(\n",
        ["tests/test_train_loss_rows.py"],
    ),
    (
        "attention_block_mask_rows",
        "a query block of the causal attention reads the mask rows of the first block",
        "ideal_jax/model/transformer.py",
        "mask = mask_bts[:, None, None, q0:q1, :s1]",
        "mask = mask_bts[:, None, None, : q1 - q0, :s1]",
        ["tests/test_attention_blocks.py"],
    ),
    (
        "attention_block_keys_short",
        "a causal attention block stops one key before its last query row",
        "ideal_jax/model/transformer.py",
        "min(t, q0 + block), min(t, q0 + block)) for q0",
        "min(t, q0 + block), min(t, q0 + block) - 1) for q0",
        ["tests/test_attention_blocks.py"],
    ),
    (
        "probe_capture_probe_not_added",
        "the capture mode records the inputs but adds no probe (no output gradients come back)",
        "ideal_jax/model/transformer.py",
        "y_nf = y_nf + capture.probes[path].astype(y_nf.dtype)",
        "y_nf = y_nf",
        ["tests/test_ekfac_captures.py", "tests/test_captured_factors.py"],
    ),
    (
        "captured_factors_unnormalised",
        "the captured factor pass adds Σ x̃x̃ᵀ without dividing by the batch's rows R_b",
        "ideal_jax/curvature/kfac.py",
        "bstate.factors[0].update((x_ri.T @ x_ri) / n_rows, 1.0, float(n_rows))",
        "bstate.factors[0].update(x_ri.T @ x_ri, 1.0, float(n_rows))",
        ["tests/test_captured_factors.py"],
    ),
    (
        "captured_fisher_data_targets",
        "the captured factor pass's Fisher mode uses the data's targets (the empirical Fisher)",
        "ideal_jax/curvature/kfac.py",
        "t_r, c_r = fisher_targets(p, self.mode, outputs_rc, batch, rng)",
        't_r, c_r = fisher_targets(p, "empirical", outputs_rc, batch, rng)',
        ["tests/test_captured_factors.py"],
    ),
    (
        "attention_cache_keys_cut",
        "with a KV cache the attention reads only as many keys as there are new queries",
        "ideal_jax/model/transformer.py",
        "        return [(0, t, None)]",
        "        return [(0, t, t)]",
        ["tests/test_decoding.py"],
    ),
    (
        "kept_correction_weight_last_batch",
        "the EK-FAC fit from kept captures divides by the last batch's weight only",
        "ideal_jax/curvature/ekfac.py",
        "        weight = weight + w\n",
        "        weight = w\n",
        ["tests/test_captured_factors.py"],
    ),
    (
        "kept_captures_over_budget",
        "the factor pass keeps its captures past the memory budget",
        "ideal_jax/curvature/kfac.py",
        "if kept.nbytes > keep_bytes:",
        "if kept.nbytes > 100 * keep_bytes:",
        ["tests/test_captured_factors.py"],
    ),
    (
        "kept_captures_with_sampled_targets",
        "the EK-FAC fit reuses the factor pass's sampled targets (a worse preconditioner)",
        "ideal_jax/curvature/kfac.py",
        'keep = keep_bytes > 0 and curvature.captured_factors and curvature.mode == "empirical"',
        "keep = keep_bytes > 0 and curvature.captured_factors",
        ["tests/test_captured_factors.py", "tests/test_cg_preconditioning.py"],
    ),
    (
        "sandbox_out_pipe_closed_twice",
        "the bwrap runner closes the flooded output pipe again (another thread's fd, in a pool)",
        "ideal_jax/evaluate/sandbox.py",
        "                            closed.add(out_r)",
        "                            pass",
        ["tests/test_sandbox_fds.py"],
    ),
    (
        "prefix_cache_not_written_through",
        "the prefix cache writes to disk only what overflows memory (other trainings recompute)",
        "ideal_jax/train/prefix_cache.py",
        "if self.directory is not None and not os.path.exists(self._path(key)):",
        "if self.directory is not None and self._bytes + hidden_td.nbytes > self.memory_bytes:",
        ["tests/test_finetuning_freeze.py"],
    ),
    (
        "prefix_fingerprint_key_types",
        "the prefix fingerprint tells a restored tree's '1' from a live tree's 1",
        "ideal_jax/train/prefix_cache.py",
        'digest.update("/".join(names).encode())',
        "digest.update(jax.tree_util.keystr(path).encode())",
        ["tests/test_finetuning_cli.py::test_freeze_influence_reads_the_training_prefix_cache"],
    ),
    (
        "influence_ignores_train_prefix_cache",
        "the influence stage recomputes the frozen layers instead of reading the training's cache",
        "ideal_jax/influence/stage.py",
        "if prefix_cache is not None and io.start and io.start == prefix_cache[1]:",
        "if False:",
        ["tests/test_finetuning_cli.py::test_freeze_influence_reads_the_training_prefix_cache"],
    ),
    (
        "correction_step_retraced",
        "EK-FAC correction step jitted anew for every fit (no per-process cache)",
        "ideal_jax/curvature/ekfac.py",
        "@functools.lru_cache(maxsize=32)\ndef _correction_jit(",
        "def _correction_jit(",
        ["tests/test_influence_pass_orders.py"],
    ),
    (
        "agreement_step_without_keep_total",
        "the budget benchmark compares steps without the keep-total projection the config asks for",
        "ideal_jax/step_agreement.py",
        "reweight.direction(alpha_j, sizes_j, keep_total)",
        "reweight.direction(alpha_j, sizes_j, False)",
        ["tests/test_alpha_agreement.py"],
    ),
    (
        "se_coverage_ignores_z",
        "the s.e. coverage counts errors within one s.e., whatever z is",
        "ideal_jax/step_agreement.py",
        "<= z * se_j",
        "<= se_j",
        ["tests/test_alpha_agreement.py"],
    ),
    (
        "curvature_allocation_equal",
        "the curvature sample takes the same number of each domain (an equal-domain mix's Hessian)",
        "ideal_jax/influence/stage.py",
        "    return proportional_counts([len(b) for b in by_domain], sum(equal))",
        "    return equal",
        ["tests/test_alpha_budget.py"],
    ),
    (
        "default_allocation_per_domain",
        "the default curvature sample switched back to an equal number per domain",
        "configs/common.py",
        'cfg.curvature.allocation = "proportional"',
        'cfg.curvature.allocation = "per_domain"',
        ["tests/test_alpha_budget.py"],
    ),
    (
        "proportional_counts_floor_only",
        "the proportional split floors every share and drops the remainder (fewer examples)",
        "ideal_jax/influence/stage.py",
        "    counts[order[: total - int(counts.sum())]] += 1",
        "    pass",
        ["tests/test_alpha_budget.py"],
    ),
]


def _copy_tree(dest: str) -> None:
    """The committed tree (HEAD), extracted to `dest`: uncommitted edits never leak in."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)


TIERS = (("unit", []), ("integration", ["-m", "integration and not slow"]))


def _pytest(tmp: str, tests: list[str], tier_args: list[str]) -> tuple[int, list[str], str]:
    """(exit code, failed node ids, stdout) of the listed tests in one tier, in the copy."""
    env = {k: v for k, v in os.environ.items() if k != "IDEAL_JAX_TEST_DEVICES"}
    env["PYTHONPATH"] = tmp
    proc = subprocess.run(
        # --tb=native: pytest's own traceback formatting crashed (INTERNALERROR, an AST recursion
        # error of Python 3.11) on one mutation's deep orbax traceback
        [sys.executable, "-m", "pytest", "-q", "-x", "--tb=native", "-p", "no:cacheprovider"]
        + tier_args
        + tests,
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [
        line.split(" ")[1]
        for line in proc.stdout.splitlines()
        if line.startswith("FAILED ") or line.startswith("ERROR ")
    ]
    return proc.returncode, failed, proc.stdout


def run_one(mutation, keep: bool = False) -> dict:
    """Apply one mutation to a copy of HEAD and run its tests: the unit tier first (the default
    `python -m pytest`), then the integration tier if the unit tier did not catch it."""
    name, what, rel, old, new, tests = mutation
    tmp = tempfile.mkdtemp(prefix=f"mut_{name}_")
    try:
        _copy_tree(tmp)
        path = os.path.join(tmp, rel)
        text = open(path, encoding="utf-8").read()
        if text.count(old) != 1:
            raise SystemExit(f"{name}: the text to mutate occurs {text.count(old)}× in {rel}")
        open(path, "w", encoding="utf-8").write(text.replace(old, new))
        start = time.perf_counter()
        caught_by, failed = None, []
        for tier, args in TIERS:
            code, failed, stdout = _pytest(tmp, tests, args)
            # pytest exits 1 when tests failed and 5 when the tier selects none of them; any
            # other non-zero code (no pytest, a collection or usage error) says nothing about
            # the mutation and must not count as caught.
            if code not in (0, 1, 5):
                raise SystemExit(f"{name}: pytest exited {code} ({tier}):\n{stdout[-2000:]}")
            if code == 1 and failed:
                caught_by = tier
                break
        return {
            "name": name,
            "what": what,
            "caught": caught_by is not None,
            "tier": caught_by,
            "failed": failed if caught_by else [],
            "seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutation names")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m[0] in args.only.split(",")]
    results = []
    for mutation in chosen:
        r = run_one(mutation)
        results.append(r)
        mark = f"caught ({r['tier']})" if r["caught"] else "NOT CAUGHT"
        print(f"{r['name']:<34} {mark:<21} {r['seconds']:>6.1f}s  {', '.join(r['failed'][:2])}")
        print(f"    {r['what']}", flush=True)
    print(json.dumps({r["name"]: r["tier"] if r["caught"] else False for r in results}))


if __name__ == "__main__":
    main()
