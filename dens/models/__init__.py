"""Equivariant models and their building blocks.

The SO(3) / SO(2) / S2 core is re-exported flatly here; the model files (EquiformerV2, eSCN, Equiformer)
build on it, and each conforms to the backbone contract :class:`Backbone` (:mod:`dens.models.interface`).
Official checkpoints are imported and exported by :mod:`dens.models.official` (not imported here: it
builds on the models).
"""

from .equiformer import Equiformer
from .equiformer_v2 import EquiformerV2
from .escn import ESCN
from .force_encoder import ForceEncoder
from .interface import Backbone, check_backbone
from .layers import (
    EquivariantDropout,
    EquivariantLayerNorm,
    GaussianSmearing,
    GraphDropPath,
    LayerNormSH,
    RadialMLP,
    RMSNormSH,
    get_normalization,
)
from .potential import ForceField, compile_backbone, require_compilable
from .s2 import S2Activation, SeparableS2Activation, SphereGrid
from .so2 import EdgeRotation, SO2Convolution, degree_rescale
from .so3 import (
    CoefficientLayout,
    SO3Linear,
    edge_frames,
    edge_frames_official,
    spherical_harmonics,
    wigner_D,
)

__all__ = [
    "ESCN",
    "Backbone",
    "CoefficientLayout",
    "EdgeRotation",
    "Equiformer",
    "EquiformerV2",
    "EquivariantDropout",
    "EquivariantLayerNorm",
    "ForceEncoder",
    "ForceField",
    "GaussianSmearing",
    "GraphDropPath",
    "LayerNormSH",
    "RMSNormSH",
    "RadialMLP",
    "S2Activation",
    "SO2Convolution",
    "SO3Linear",
    "SeparableS2Activation",
    "SphereGrid",
    "check_backbone",
    "compile_backbone",
    "degree_rescale",
    "edge_frames",
    "edge_frames_official",
    "get_normalization",
    "require_compilable",
    "spherical_harmonics",
    "wigner_D",
]
