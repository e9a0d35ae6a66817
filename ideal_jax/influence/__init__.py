"""Influence of training domains and examples on the reference loss (Lemma 1)."""

from ideal_jax.compat import kfac_jax_shim

kfac_jax_shim.apply()
