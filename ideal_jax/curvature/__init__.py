"""Curvature of the training loss (Lemma 1's H): K-FAC via kfac-jax, EK-FAC, exact references.

Importing this package applies the kfac-jax compatibility shim when the installed kfac-jax needs it.
"""

from ideal_jax.compat import kfac_jax_shim

kfac_jax_shim.apply()
