"""Influence scores from prepared inverse-Hessian-vector products.

  influence.py        `Influence`: scores, top_k, self_influence, inverse_hvp, parameter_change
  gradients.py        per-example gradients and gradient-vector products of one batch
  factored_scores.py  EKFAC/KFAC scores layer by layer, without per-example training gradients
  topk.py             `TopK`, the most helpful / harmful training examples
  streaming.py        `score_to_file`: the score matrix streamed to disk, resumable
  measurements.py     `Measurement`: what is attributed on the test side (loss, margin, logit, ...)
  per_layer.py        `layer_scores`: the score matrix split by layer
  group.py            `group_influence`: first- and second-order effects of removing sets of examples
"""

from tf_influence.influence import measurements
from tf_influence.influence.factored_scores import ekfac_scores
from tf_influence.influence.group import GroupInfluence, group_influence
from tf_influence.influence.influence import Influence
from tf_influence.influence.measurements import Measurement
from tf_influence.influence.per_layer import layer_scores
from tf_influence.influence.streaming import score_to_file
from tf_influence.influence.topk import TopK, top_k

__all__ = ["GroupInfluence", "Influence", "Measurement", "TopK", "ekfac_scores", "group_influence", "layer_scores",
           "measurements", "score_to_file", "top_k"]
