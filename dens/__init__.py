"""dens: equivariant force fields trained with DeNS (denoising non-equilibrium structures).

Subpackages: :mod:`dens.models` (the SO(3)/SO(2) core and the models), :mod:`dens.data` (datasets,
graphs), :mod:`dens.testing` (equivariance test helpers), :mod:`dens.ops` (scatter operations),
:mod:`dens.runtime` (process settings for fast CPU training).
"""

__version__ = "0.1.0"
