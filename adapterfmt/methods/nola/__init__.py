"""NOLA: the method descriptor, the portable Philox generator, its numpy reference, the basis
generators (portable and legacy import provenance), and the conversions to and from LoRA."""
from .generator import nola_basis
from .method import NOLA_METHOD
from .module import SIDES, derive_seed, fl32, nola_module, side_dims

__all__ = ["NOLA_METHOD", "SIDES", "derive_seed", "fl32", "nola_basis", "nola_module", "side_dims"]
