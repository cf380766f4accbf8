"""`TopK`: the most helpful and most harmful training examples for each test point."""

import dataclasses

import numpy as np

from tf_influence.errors import InputError


@dataclasses.dataclass(frozen=True)
class TopK:
    """Most helpful (largest score) and most harmful (smallest score) training examples per test point.

    Each array is `[n_test, k]`; indices point into the training data in its original order.
    """

    helpful_indices: np.ndarray
    helpful_scores: np.ndarray
    harmful_indices: np.ndarray
    harmful_scores: np.ndarray


def top_k(scores, k):
    """The `k` largest and `k` smallest entries of each row of `scores` `[n_test, n_train]`, as a `TopK`.

    Ties keep the training data's order (a stable sort).

    Example:
      >>> top_k(np.array([[0.5, -1.0, 2.0]]), 1).helpful_indices
      array([[2]])
    """
    scores = np.asarray(scores)
    n = scores.shape[1]
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise InputError(f"k must be an integer in [1, n_train={n}]. Received: k={k!r}.")
    helpful = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(scores, axis=1, kind="stable")[:, :k]
    return TopK(helpful, np.take_along_axis(scores, helpful, 1), harmful, np.take_along_axis(scores, harmful, 1))
