"""cns: Concept Neuron Selection, continual personalization for Stable Diffusion models
(Liao, Chen et al., *Continual Personalization for Diffusion Models*, ICCV 2025)."""

__version__ = "0.1.0"

from .config import LearnConfig  # noqa: E402
from .errors import CNSError  # noqa: E402
from .library import ConceptLibrary, ConceptSpec  # noqa: E402

__all__ = ["__version__", "ConceptLibrary", "ConceptSpec", "LearnConfig", "CNSError"]
