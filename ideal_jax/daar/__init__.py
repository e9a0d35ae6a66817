"""DaaR, diversity as a reward (METHOD.md §2): a semantically diverse SFT subset without labels.

  generation.py  model-aware synthetic (instruction, response) pairs per domain, τ-filtered
  centroids.py   padding-masked token-mean embeddings (input embeddings / shallow hidden states)
  kmeans.py      jitted Lloyd k-means, initialized at the domain centroids → pseudo-labels
  probes.py      ψ_dom (domain classifier) and ψ_div (predicts ψ_dom's entropy) MLP probes
  selection.py   top-fraction / per-domain / customized selection (+ a k-center baseline), writer
  config.py      DaarConfig.from_section(cfg.daar): typed, validated; the fields each stage reads
  pipeline.py    run_daar (stages cached under a workdir via ideal_jax.artifacts), pseudo_domains,
                 relabel
  store.py       atomic .npz / text writers of DaaR's non-JSON artifacts
  job.py         mode=daar and pseudo-domains for IDEAL from an ml_collections config
  demo_pools.py  pools with known hidden domains (premise, charset) for benchmarks and tests

The submodules are imported explicitly (`from ideal_jax.daar import pipeline`) so that importing the
package stays cheap.
"""
