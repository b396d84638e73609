"""Pixel attributions of the well-kept libraries behind one call.

``attribute(model, images, targets, methods=["ig", "lrp", "crp"])`` runs captum, zennit and zennit-crp
methods (and leapcore's internal influence and attention rollout) through leapcore's adapter. The
libraries are imported only when a method runs, so ``import leapcore.attribution`` needs none of them.
"""

from leapcore.attribution.consensus import ConsensusResult, consensus
from leapcore.attribution.core import AttributionResult, attribute, find_layer
from leapcore.attribution.normlime import NormLimeResult, glime, normlime
from leapcore.attribution.registry import MethodSpec, get_method, list_methods, register_method

__all__ = [
    "AttributionResult",
    "ConsensusResult",
    "MethodSpec",
    "NormLimeResult",
    "attribute",
    "consensus",
    "find_layer",
    "get_method",
    "glime",
    "list_methods",
    "normlime",
    "register_method",
]
