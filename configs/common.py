"""Shared defaults for every ideal_jax config: one section per pipeline stage.

Not a runnable config by itself; `demo.py`, `tiny.py`, `llama3_8b_ideal.py`, ... start from
`base_config()` and change what differs. Field meanings are documented here, once.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.mode = (
        "ideal"  # ideal | sft | influence | eval | daar | export | compare (ideal_jax/main.py)
    )
    # Retrainings after D0 (the paper: 2, D0 -> D1 -> D2); with the trust-region policy rejected
    # rounds count too (docs/method_choices.md, "Step policy")
    cfg.rounds = 3
    cfg.seed = 0
    cfg.seeds = 1  # repeat with seeds seed..seed+seeds-1: paired 95% CIs (ideal, compare)
    cfg.progress = True  # progress bars

    # --- data: domains, reference set, formatting, batching (ideal_jax/data) ---
    cfg.data = ml_collections.ConfigDict()
    cfg.data.demo = False  # build the embedded synthetic suite into WORKDIR/demo_data
    cfg.data.demo_train_sizes = ml_collections.ConfigDict()  # capability -> examples (demo)
    # Demo tables: each capability's rows are split into a dev part (demo_n_ref rows: the
    # reference set, on which every method makes its choices) and a disjoint test part
    # (demo_n_test rows: scores only); n_test + n_ref must fit the table (64 rows).
    cfg.data.demo_n_test = 100
    cfg.data.demo_n_ref = 40
    # Each demo domain's source file holds demo_pool_factor × its demo_train_sizes share (same
    # graded frequencies); D0 draws its share from it (1: the source is D0, as before v3).
    cfg.data.demo_pool_factor = 1
    cfg.data.domains = ml_collections.ConfigDict()  # domain name -> file / saved dataset dir
    cfg.data.source = ""  # or: one file whose records carry `domain_field`
    cfg.data.domain_field = "domain"
    cfg.data.domain_names = ()  # required domains when using `source` (empty: all found)
    # Keep at most this many examples of each training domain (a seeded random subset, file
    # order kept; seed = cfg.seed); 0: all. For quick runs on large files.
    cfg.data.max_examples_per_domain = 0
    # D0's share of each domain's source (domain -> examples, drawn at random without
    # replacement); a domain not named keeps its whole source. The rest of the source is the
    # pool that a growing domain draws from (upsample).
    cfg.data.initial_sizes = ml_collections.ConfigDict()
    # What a growing domain adds: fresh_first = examples of its source the mixture does not
    # hold yet, repeats only once the source is exhausted | repeat = duplicates of the mixture's
    # own examples (the paper's behaviour)
    cfg.data.upsample = "fresh_first"
    cfg.data.reference = ml_collections.ConfigDict()  # capability -> file; or:
    cfg.data.reference_source = ""  # one file whose records carry a `capability` field
    cfg.data.field_map = ml_collections.ConfigDict()  # canonical field -> your field name
    cfg.data.tokenizer = ""  # local HF tokenizer dir (defaults to the model dir)
    cfg.data.max_len = 128  # tokens per example after formatting
    cfg.data.truncate = "left_prompt"  # left_prompt | right | drop
    cfg.data.batching = "pack"  # pack (segment ids) | pad

    # --- model (ideal_jax/model) ---
    cfg.model = ml_collections.ConfigDict()
    cfg.model.path = ""  # local HF checkpoint dir; empty: random init from `preset`
    cfg.model.preset = "tiny"
    cfg.model.dtype = "float32"  # compute dtype (parameters stay float32)
    cfg.model.remat = False

    # --- train: full-parameter SFT on the round's mixture (ideal_jax/train) ---
    cfg.train = ml_collections.ConfigDict()
    cfg.train.epochs = 1
    # Optimizer steps of every training (every round, every compare method): d0_steps = those of
    # D0's `epochs` epochs (equal compute and schedule whatever the mixture; a mixture with more
    # packed rows sees part of an epoch less, one with fewer continues into a reshuffled pass) |
    # epochs = `epochs` passes over each mixture (step counts differ with the mixture)
    cfg.train.budget = "d0_steps"
    cfg.train.batch_size = 32  # global rows per optimizer step
    cfg.train.seq_len = 128
    cfg.train.grad_accum = 1
    cfg.train.learning_rate = 1e-3
    cfg.train.warmup_steps = 10
    cfg.train.schedule = "cosine"  # cosine | linear | constant
    cfg.train.end_lr_fraction = 0.1
    cfg.train.weight_decay = 0.0
    cfg.train.b1 = 0.9
    cfg.train.b2 = 0.95
    cfg.train.grad_clip = 1.0
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 100
    cfg.train.keep_checkpoints = 2
    cfg.train.seed = 0
    cfg.train.warm_start = False  # True: round k starts from round k-1's model (cheaper variant)
    # Which parameters train (LLaMA-Factory's finetuning_type; ideal_jax/train/finetuning.py):
    # full | freeze (the top freeze_trainable_layers decoder layers; embedding, lower layers,
    # final norm and head frozen) | lora (adapters on lora_targets, base frozen; exported merged)
    cfg.train.finetuning = "full"
    cfg.train.freeze_trainable_layers = 2  # freeze: N, 1 <= N <= the model's decoder layers
    # freeze: the frozen layers' output is computed once per example and reused by every epoch,
    # round and method (up to prefix_cache_gib in memory, the rest in WORKDIR/prefix_cache)
    cfg.train.prefix_cache = True
    cfg.train.prefix_cache_gib = 2.0
    cfg.train.lora_rank = 8  # lora: r >= 1
    cfg.train.lora_alpha = 16.0  # lora: the update is (alpha / r) · A B
    # lora: all | comma-separated subset of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj
    cfg.train.lora_targets = "all"

    # --- curvature: kfac-jax K-FAC / EK-FAC factors (ideal_jax/curvature) ---
    cfg.curvature = ml_collections.ConfigDict()
    cfg.curvature.layers = "mlp"  # preset (mlp | attention | all_linear) or comma-separated regexes
    # fisher: true Fisher, targets sampled from the model (= GGN for softmax CE; Kronfluence's
    # default, and the estimator the accuracy tests measure) | empirical: gradients at the data
    cfg.curvature.estimator = "fisher"
    # Which mixture entries the passes read (ideal_jax/influence/stage.py plan_subsample):
    #   alpha_se  factors and correction on `examples_per_domain` entries of each domain; domain
    #             gradients from those, doubling per domain while α's standard error (row "all")
    #             is above alpha_se_target × the RMS of α over the domains, at most
    #             max_examples_per_domain (cost flat in the data size; influence.json says why
    #             it stopped)
    #   fixed     `examples_per_domain` entries of each domain for every pass
    #   sigma     a σ fraction of each domain for every pass (the paper; cost grows with |D|)
    # examples_per_domain = 0 means sigma whatever `subsample` says (configs from before it).
    cfg.curvature.subsample = "alpha_se"
    cfg.curvature.examples_per_domain = 64
    cfg.curvature.max_examples_per_domain = 512
    cfg.curvature.alpha_se_target = 0.2
    cfg.curvature.sigma = 0.5  # subsample = sigma: the fraction of each domain
    # alpha_se / fixed: how the curvature passes' examples (as many as examples_per_domain of
    # each domain) are split over the domains: proportional to the domains' entries in the
    # mixture (the mixture's own Hessian) | per_domain (examples_per_domain each: the Hessian of
    # an equal-domain mix, which biased α; docs/results/alpha_budget_s11.md)
    cfg.curvature.allocation = "proportional"
    cfg.curvature.batch_size = 32
    # The decoder layers below the lowest curvature layer run once per example and their output is
    # kept (at most this many GiB; 0: off): the passes then run only the layers from there up.
    cfg.curvature.prefix_cache_gib = 2.0
    cfg.curvature.correction = "per_example"  # EK-FAC eigenvalue fit: per_example | per_batch
    # EK-FAC with the empirical Fisher: the factor pass keeps each batch's layer inputs and output
    # gradients (at most this many GiB; 0: off) and the eigenvalue fit reads them instead of
    # running the model again (the same Λ*). The true Fisher draws fresh targets for the fit.
    cfg.curvature.keep_captures_gib = 1.0
    cfg.curvature.damping = 0.1
    cfg.curvature.relative_damping = True  # damping × mean eigenvalue of each block (Kronfluence)
    # Accelerator memory for planning layer groups (0: ask the runtime; CPU: one group).
    cfg.curvature.device_memory_gib = 0.0

    # --- influence: α = −g_refᵀ H⁻¹ g_j (ideal_jax/influence) ---
    cfg.influence = ml_collections.ConfigDict()
    cfg.influence.operator = (
        "ekfac"  # identity | kfac | ekfac | exact | exact_block | cg | cg_block
    )
    # cg / cg_block (the exact GGN of the selected layers, whole or per layer block, solved by
    # conjugate gradient): stop at this relative residual or step count; preconditioner: none |
    # kfac | ekfac (that damped inverse, its factors fitted first; suits cg_block, whose blocks
    # it approximates; on SmolLM2 unpreconditioned CG had not converged after 150 steps)
    cfg.influence.cg_tol = 1e-6
    cfg.influence.cg_max_iters = 200
    cfg.influence.cg_preconditioner = "none"
    cfg.influence.scaling = "paper"  # paper | exact (METHOD.md §1.1)
    # The "all" row that sets β: capability (each capability's mean loss counts equally) | token
    cfg.influence.reference_weighting = "capability"
    cfg.influence.batch_size = 32

    # --- reweight: β from α (ideal_jax/reweight.py) ---
    cfg.reweight = ml_collections.ConfigDict()
    # Every ReweightConfig field, with the only defaults it has (tests/test_reweight.py).
    # paper (largest |β| = m) | optax (state kept across rounds) | outer (steps on Q, trust m)
    cfg.reweight.rule = "paper"
    # m: the largest |β| of the first step (trust_region), of every step (fixed); the paper tried
    # 0.1, 0.15, 0.3 and recommends 0.15 with a fixed m. 0.5: docs/method_choices.md, "Step policy"
    cfg.reweight.step_size = 0.5
    # The step policy (ideal_jax/step_policy.py): trust_region = retrain, accept a step only if
    # the dev objective improved (then widen the next by `widen`, up to step_max), else return
    # to the incumbent and shrink by `shrink`, stopping below step_min; step_size is the first
    # step | fixed = the paper (every step kept, m = step_size)
    cfg.reweight.policy = "trust_region"
    cfg.reweight.step_max = 2.0
    cfg.reweight.step_min = 0.2
    cfg.reweight.widen = 2.0
    cfg.reweight.shrink = 0.5
    # The dev objective the policy compares: reference_loss (the dev split's) | dev_score
    # (exact match on the reference rows, generated: slower)
    cfg.reweight.accept_on = "reference_loss"
    cfg.reweight.keep_total = True  # the total volume stays N: equal training tokens across rounds
    cfg.reweight.beta_min = -0.9  # never drop more than 90% of a domain in one round
    cfg.reweight.beta_max = 3.0
    cfg.reweight.min_volume = 1  # examples a domain keeps at least
    # Domains whose |α| < significance_z standard errors are reported (summary.json
    # rounds[K].indistinguishable); hold_indistinguishable keeps their volume this round.
    cfg.reweight.significance_z = 2.0
    cfg.reweight.hold_indistinguishable = False
    cfg.reweight.optimizer = "sgd"  # rule = optax: an optax constructor name
    cfg.reweight.learning_rate = 0.15  # optax: the gradient it sees is scale-free (max |g| = 1)
    # rule = outer: optax steps on the outer objective Q(w) in the trust region |β| <= step_size;
    # sgd = projected gradient on the logits (Adam stalled at the box's faces on the known answer)
    cfg.reweight.outer_optimizer = "sgd"
    cfg.reweight.outer_learning_rate = 0.05  # log-proportion per step (gradients are scale-free)
    cfg.reweight.outer_steps = 20

    # --- eval (ideal_jax/evaluate) ---
    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.demo = True  # per-capability exact match on the demo suite's test split
    cfg.eval.tasks = ml_collections.ConfigDict()  # name -> {type, path, ...} benchmark tasks
    cfg.eval.max_new_tokens = 32
    cfg.eval.batch_size = 64
    cfg.eval.limit = 0  # 0 = all test items
    # How HumanEval/MBPP completions run (docs/sandbox.md): bwrap = bubblewrap namespaces, refuse
    # without it; inprocess = the weaker in-process guard; auto = bwrap, else inprocess + warning.
    cfg.eval.code_sandbox = "bwrap"

    # --- export: the trained model as a Hugging Face directory (ideal_jax/export.py) ---
    cfg.export = ml_collections.ConfigDict()
    cfg.export.final_model = True  # ideal / sft runs write DIR/final_model/ when they end
    cfg.export.round = -1  # mode=export: the round written to DIR/round_K/hf_model (-1: last)
    cfg.export.dtype = "float32"  # safetensors dtype: float32 | bfloat16

    # --- compare: mode=compare, IDEAL against baselines at equal volume (ideal_jax/compare) ---
    cfg.compare = ml_collections.ConfigDict()
    # any of ideal, d0, uniform, random, regmix, doremi (d0 is always run: the pairing base)
    cfg.compare.methods = "ideal,d0,uniform,random,regmix,doremi"
    cfg.compare.k = 6  # random mixtures (Dirichlet draws); "random" = the best, RegMix fits them
    cfg.compare.dirichlet_concentration = 1.0
    cfg.compare.regmix_candidates = 100_000  # simulated proportions RegMix ranks
    cfg.compare.regmix_top = 100  # its proposal = the mean of the best `top` of them
    cfg.compare.doremi_eta = 1.0  # DoReMi's domain-weight step size
    cfg.compare.doremi_smoothing = 1e-3  # mixed with uniform at every step

    # --- mesh (ideal_jax/sharding.py): -1 = all remaining devices ---
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # --- daar: diversity-as-reward selection (ideal_jax/daar; field meanings: DaarConfig) ---
    cfg.daar = ml_collections.ConfigDict()
    cfg.daar.pool = ""  # unlabeled pool file (any record form; domain labels, if any, ignored)
    cfg.daar.probe = ""  # probe set file (same distribution as the pool, disjoint)
    cfg.daar.domains = ml_collections.ConfigDict()  # name -> one-sentence description
    cfg.daar.tau = ml_collections.ConfigDict()  # name -> similarity threshold (0.85; 0.9 math)
    cfg.daar.generator = "model"  # model: the base model writes the pairs | file: seed_pairs
    cfg.daar.seed_pairs = ""  # JSONL of {domain, prompt, response} pairs for generator=file
    # Every DaarConfig field, with the only defaults it has (ideal_jax/daar/config.py has none;
    # tests/test_daar_config.py); paper deviations and the measurements behind them:
    # docs/method_choices.md, DaaR.
    cfg.daar.seeds_per_domain = 5
    cfg.daar.target_per_domain = 10  # paper: 10-30
    cfg.daar.min_per_domain = 3  # fewer accepted pairs when the budget is spent: an error
    cfg.daar.max_attempts_per_domain = 100  # every generation counts, parseable or not
    cfg.daar.counter_examples = 3
    cfg.daar.seed_temperature = 0.9
    cfg.daar.augment_temperature = 0.95
    cfg.daar.top_p = 0.95
    cfg.daar.max_new_tokens = 256
    cfg.daar.centroid_source = "input"  # input (paper) | hidden
    cfg.daar.centroid_layer = 0  # for centroid_source=hidden
    cfg.daar.feature_layer = 3  # probe features: hidden state after this many decoder layers
    cfg.daar.feature_norm = True  # final RMSNorm on the probe features (public code)
    cfg.daar.max_len = 256  # tokens embedded per text
    cfg.daar.embed_batch_size = 64
    cfg.daar.kmeans_metric = "euclidean"  # euclidean (paper) | cosine
    cfg.daar.kmeans_max_iters = 100
    cfg.daar.probe_lr = 1e-3  # paper 1e-5 (ψ_dom val accuracy 0.77 vs 0.97 measured)
    cfg.daar.probe_epochs = 20  # paper 1
    cfg.daar.probe_batch_size = 32  # paper 1
    cfg.daar.probe_hidden = ()  # (): the paper's MLP widths 2d, d, d/2, 256
    cfg.daar.probe_val_fraction = 0.03  # paper: 97/3 split
    cfg.daar.probe_weight_decay = 0.0  # > 0: AdamW
    cfg.daar.probe_patience = 0  # > 0: early stopping on the validation loss
    cfg.daar.probe_cross_fit_folds = 5  # ψ_div learns held-out ψ_dom entropy; 0: in-sample
    cfg.daar.select_fraction = 0.2
    cfg.daar.select_method = "top_fraction"  # top_fraction (paper) | per_domain
    cfg.daar.customized_target = ""  # a domain name: the paper's "customized" variant
    cfg.daar.customized_fractions = (0.5, 0.1)  # (target domain, each other domain)
    cfg.daar.seed = 0
    cfg.daar.use_for_ideal = False  # True: IDEAL's domains are DaaR pseudo-domains of the pool
    return cfg


def apply_overrides(cfg: ml_collections.ConfigDict, arg: str | None) -> None:
    """Apply `--config FILE.py:key=value,key=value` arguments (dotted keys allowed).

    Raises InputError naming the key for an item that is not key=value, an unknown key or a value
    that does not parse as the field's type.
    """
    from ideal_jax.utils.errors import InputError

    if not arg:
        return
    for item in arg.split(","):
        if "=" not in item:
            raise InputError(f"config argument {item!r} is not key=value", field=item.strip())
        key, value = item.split("=", 1)
        key = key.strip()
        node = cfg
        *parents, leaf = key.split(".")
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                raise InputError(
                    f"config argument names an unknown section {'.'.join(parents[: i + 1])!r}",
                    field=key,
                )
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            known = ", ".join(sorted(node)) if isinstance(node, ml_collections.ConfigDict) else ""
            raise InputError(
                "config argument names an unknown field" + (f"; allowed: {known}" if known else ""),
                field=key,
            )
        current = node[leaf]
        if isinstance(current, bool):
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise InputError(f"expected a bool (true | false), got {value!r}", field=key)
            node[leaf] = value.lower() in ("1", "true", "yes")
        elif isinstance(current, int | float):
            try:
                node[leaf] = type(current)(value)
            except ValueError:
                raise InputError(
                    f"expected a value of type {type(current).__name__}, got {value!r}", field=key
                ) from None
        else:
            node[leaf] = value
