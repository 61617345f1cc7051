"""relprop: class-specific relevance propagation for Transformers.

Implements *Transformer Interpretability Beyond Attention Visualization* (Chefer, Gur & Wolf,
CVPR 2021) and the baselines it compares against, on Hugging Face and timm models as they are.
"""
from .errors import InputError, OptionError, RelpropError, UnknownMethodError, UnsupportedModelError
from .explainer import Explainer
from .registry import families  # the function; the registry module is relprop.registry
from .attributions import method_names as methods  # the function; the subpackage is relprop.attributions
from .result import Explanation, Internals, normalize

__version__ = "0.1.0"

__all__ = ["Explainer", "Explanation", "Internals", "families", "methods", "normalize", "RelpropError", "InputError",
           "OptionError", "UnknownMethodError", "UnsupportedModelError"]
