"""Influence scores from prepared inverse-Hessian-vector products.

  influence.py        `Influence`: scores, top_k, self_influence, inverse_hvp, parameter_change
  gradients.py        per-example gradients and gradient-vector products of one batch
  factored_scores.py  EKFAC/KFAC scores layer by layer, without per-example training gradients
  topk.py             `TopK`, the most helpful / harmful training examples
  streaming.py        `score_to_file`: the score matrix streamed to disk, resumable
"""

from tf_influence.influence.factored_scores import ekfac_scores
from tf_influence.influence.influence import Influence
from tf_influence.influence.streaming import score_to_file
from tf_influence.influence.topk import TopK, top_k

__all__ = ["Influence", "TopK", "ekfac_scores", "score_to_file", "top_k"]
