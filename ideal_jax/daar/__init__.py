"""DaaR, diversity as a reward (METHOD.md §2): a semantically diverse SFT subset without labels.

  generation.py  model-aware synthetic (instruction, response) pairs per domain, τ-filtered
  centroids.py   padding-masked token-mean embeddings (input embeddings / shallow hidden states)
  kmeans.py      jitted Lloyd k-means, initialized at the domain centroids → pseudo-labels
  probes.py      ψ_dom (domain classifier) and ψ_div (predicts ψ_dom's entropy) MLP probes
  selection.py   top-fraction / per-domain / customized selection (+ a k-center baseline), writer
  pipeline.py    run_daar (resumable stages under a workdir), pseudo_domains, relabel; DaarConfig
  job.py         mode=daar and pseudo-domains for IDEAL from an ml_collections config
  demo_pools.py  pools with known hidden domains (premise, charset) for benchmarks and tests

The submodules are imported explicitly (`from ideal_jax.daar import pipeline`) so that importing the
package stays cheap.
"""
