"""Orthogonal Finetuning (Qiu et al., NeurIPS 2023): torch-only maths, layers and injection."""

from .config import OFTConfig
from .energy import hyperspherical_energy, hyperspherical_energy_estimate, neuron_subset
from .inject import (
    batched_rotations,
    inject_oft,
    load_oft_state_dict,
    merge_oft,
    oft_layers,
    oft_parameter_count,
    oft_parameters,
    oft_state_dict,
    project_coft_,
    unmerge_oft,
)
from .layers import OFTConv2d, OFTLayer, OFTLinear
from .rotation import (
    cayley,
    cayley_exact,
    cayley_neumann,
    neumann_orthogonality_bound,
    params_from_skew,
    rotate_weight,
    skew_from_params,
)

__all__ = [
    "batched_rotations",
    "OFTConfig",
    "OFTConv2d",
    "OFTLayer",
    "OFTLinear",
    "cayley",
    "cayley_exact",
    "cayley_neumann",
    "hyperspherical_energy",
    "hyperspherical_energy_estimate",
    "inject_oft",
    "load_oft_state_dict",
    "merge_oft",
    "neumann_orthogonality_bound",
    "neuron_subset",
    "oft_layers",
    "oft_parameter_count",
    "oft_parameters",
    "oft_state_dict",
    "params_from_skew",
    "project_coft_",
    "rotate_weight",
    "skew_from_params",
    "unmerge_oft",
]
