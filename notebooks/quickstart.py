# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # ideal_jax quickstart: one IDEAL round on a tiny model
#
# IDEAL decides **how much** of each SFT domain to train on. One round:
#
# 1. fine-tune the model on the current mixture $D_k$,
# 2. score it per capability,
# 3. measure with influence functions (EK-FAC inverse Hessian) how the loss on a reference set
#    would change if each domain had more or less data: the vector **α**,
# 4. turn α into a volume change **β** per domain and resample the mixture $D_{k+1}$.
#
# This notebook runs one round on the embedded synthetic 5-capability suite
# (`arithmetic`, `lookup`, `reverse`, `sort`, `uppercase`) with a ~0.1M-parameter model,
# using `configs/tiny.py`. It takes a minute or two on a CPU, and runs unchanged on a GPU or TPU
# runtime.

# %%
# Colab set-up: install the package from a checkout of the repository (harmless elsewhere).
import os
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules


def find_repo_root() -> str | None:
    """The repository root: $IDEAL_JAX_ROOT, or the first parent of the cwd with configs/tiny.py."""
    candidates = [os.environ.get("IDEAL_JAX_ROOT", "")]
    here = os.path.abspath(os.getcwd())
    while True:
        candidates.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    candidates.append("/content/ideal_jax")  # the usual place of a clone in Colab
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "configs", "tiny.py")):
            return os.path.abspath(path)
    return None


ROOT = find_repo_root()
if IN_COLAB:
    if ROOT is None:
        print(
            "Clone the ideal_jax repository first, e.g. in a cell:\n"
            "    !git clone <repository url> /content/ideal_jax\n"
            "then run this notebook again (or set IDEAL_JAX_ROOT to the checkout)."
        )
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ROOT], check=True)
if ROOT is None:
    raise RuntimeError("ideal_jax repository not found: set IDEAL_JAX_ROOT to its directory")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # `configs` lives next to the package, not inside it
print("repository:", ROOT)

# %% [markdown]
# ## The config
#
# Every stage has its own section (`cfg.data`, `cfg.model`, `cfg.train`, `cfg.curvature`,
# `cfg.influence`, `cfg.reweight`, `cfg.eval`, `cfg.mesh`). `configs/tiny.py` is a short
# loop: 360 training examples, 1 epoch, 1 round (so $D_0 \to D_1$). Swap in `configs/demo.py`
# for a run where the model actually learns the tasks (it takes considerably longer on a CPU).

# %%
import json
import tempfile
import time
import warnings

import jax

from configs import tiny
from ideal_jax import main

cfg = tiny.get_config()
cfg.progress = False  # no progress bars in a notebook's output
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets
WORKDIR = os.environ.get("IDEAL_JAX_WORKDIR") or os.path.join(
    tempfile.gettempdir(), "ideal_jax_quickstart"
)
print("devices:", jax.devices())
print("workdir:", WORKDIR)
print("rounds:", cfg.rounds, "| model preset:", cfg.model.preset, "| operator:", end=" ")
print(cfg.influence.operator, "| step size m:", cfg.reweight.step_size)
print("domain volumes:", dict(cfg.data.demo_train_sizes))

# %% [markdown]
# ## Run one round
#
# `ideal_jax.main.run(cfg, workdir)` is the function behind
# `python -m ideal_jax.main --config configs/tiny.py --workdir DIR`. It writes every artifact under
# the workdir; rerunning it on the same workdir resumes (finished stages are skipped). A workdir
# remembers its config: after changing the config, pick a new workdir.

# %%
start = time.perf_counter()
result = main.run(cfg, WORKDIR)
print(f"done in {time.perf_counter() - start:.1f} s")
print(sorted(os.listdir(WORKDIR)))


# %%
def load(*parts):
    with open(os.path.join(WORKDIR, *parts)) as f:
        return json.load(f)


def table(rows, header, first="", fmt="{:>12.3f}"):
    """A plain-text table: `rows` maps a row name to a list of values."""
    width = max([len(first)] + [len(str(name)) for name in rows])
    lines = [f"{first:<{width}} " + "".join(f"{h:>12}" for h in header)]
    for name, values in rows.items():
        cells = "".join(fmt.format(v) if isinstance(v, float) else f"{v!s:>12}" for v in values)
        lines.append(f"{name:<{width}} " + cells)
    print("\n".join(lines))


# %% [markdown]
# ## α: which domains help the reference set
#
# `round_0/influence.json` holds the α matrix. Row `all` is the whole reference set, the other rows
# one capability each; columns are the training domains. By Lemma 1 of the paper,
#
# $$\alpha_j = -\nabla L(D_{\mathrm{ref}}, \theta)^\top H^{-1} \nabla L(D_j, \theta)
#   \;\approx\; \frac{\partial\, L(D_{\mathrm{ref}})}{\partial \beta_j},$$
#
# the change of the reference loss when domain $j$ is up-weighted, with $H^{-1}$ approximated by
# EK-FAC blocks over the MLP layers. **Negative α: more of domain j lowers the reference loss**
# (add data); positive α: it hurts (remove data). Off-diagonal entries show transfer between
# capabilities.

# %%
influence = load("round_0", "influence.json")
table(
    dict(zip(influence["rows"], influence["matrix"])),
    influence["domains"],
    first="reference \\ domain",
    fmt="{:>12.1f}",
)
print(f"\noperator={influence['operator']}, scaling={influence['scaling']}, sigma=", end="")
print(f"{influence['sigma']}, layers={len(influence['layers'])}")

# %% [markdown]
# ## β: the new volumes
#
# β turns α into a relative volume change: $\beta = -\frac{m}{\max_j |\alpha_j|}\,\alpha$ with
# step size $m = 0.15$, so the domain with the largest $|\alpha|$ moves by exactly ±15% and
# the others proportionally. Domain $j$ then gets $(1 + \beta_j)\,|D_j|$ examples (resampled),
# rescaled so the total stays fixed (`keep_total`: every round trains on the same number of
# examples). With `keep_total` only the differences between the β's matter: early in training
# every domain lowers the reference loss (all α < 0), and volume still moves from the domains
# with the smallest |α| to those with the largest. `round_K/mixture.json` records sizes, β and
# how often each example is repeated.

# %%
domains = influence["domains"]
alpha = result["rounds"][0]["alpha"]  # the "all" row of the matrix above
beta = result["rounds"][0]["beta"]
mix0 = load("round_0", "mixture.json")["domains"]
mix1 = load("round_1", "mixture.json")["domains"]
table(
    {
        d: [
            mix0[d]["target_size"],
            f"{alpha[d]:.1f}",
            f"{beta[d]:+.3f}",
            f"{(1 + beta[d]) * mix0[d]['target_size']:.1f}",
            mix1[d]["target_size"],
        ]
        for d in domains
    },
    ["|D0|", "α (all)", "β", "(1+β)|D0|", "|D1|"],
    first="domain",
)
total0 = sum(m["target_size"] for m in mix0.values())
total1 = sum(m["target_size"] for m in mix1.values())
print(f"\ntotal examples: D0 {total0}, D1 {total1}")

# %% [markdown]
# ## Scores per capability
#
# Each round's model is scored by exact match on the suite's test split (`round_K/eval.json`),
# together with the reference loss per capability. The tiny config trains for one short epoch, so
# accuracies stay near zero; the reference losses already move. `configs/demo.py` trains long
# enough for the accuracies to rise.

# %%
scores = result["scores"]
caps = list(scores[0])
table({f"D{k}": [row[c] for c in caps] for k, row in enumerate(scores)}, caps, first="round")
print()
losses = result["reference_loss"]
table(
    {f"D{k}": list(row.values()) for k, row in enumerate(losses)}, list(losses[0]), first="ref loss"
)
print("\nstage timings (s):", {f"round_{r['round']}": r["timings"] for r in result["rounds"]})

# %% [markdown]
# ## summary.png
#
# Volumes per domain, scores per capability and α, across rounds (also written for longer runs).

# %%
from IPython.display import Image, display

display(Image(filename=os.path.join(WORKDIR, "summary.png")))

# %% [markdown]
# ## Next
#
# - More rounds and real learning: `python -m ideal_jax.main --config configs/demo.py
#   --workdir runs/demo`. Fields can be overridden after a colon, e.g.
#   `configs/tiny.py:rounds=2,train.epochs=3` (in Python: `tiny.get_config("rounds=2")`).
# - Your own data: point `cfg.data.domains` at one JSONL file per domain and
#   `cfg.data.reference` at the reference sets, and `cfg.model.path` at a local Hugging Face
#   checkpoint (see `configs/llama3_8b_ideal.py`).
# - The optimized mixture as plain chat records: `WORKDIR/final_mixture.jsonl`.
