"""`Problem`: what influence is taken of — a model, its training objective, the data and the selected variables.

    R(θ) = Σᵢ wᵢ ℓ(zᵢ, θ) / Σᵢ wᵢ  +  Ω(θ)        over the selected variables θ

A `Problem` is built and validated once (the model is callable on the data, the loss gives finite
per-example losses, the variables are trainable variables of the model, the strategy is usable) and
then shared by every later stage: curvature operators, factor fitting, solvers, scoring and export
read it and never re-validate. It holds no curvature and computes nothing expensive.
"""

import hashlib

import numpy as np
import tensorflow as tf

from tf_influence.data import as_batches, batch_count, dataset_of, first_batch
from tf_influence.data import fingerprint as data_fingerprint
from tf_influence.distribute import resolve_strategy
from tf_influence.errors import InputError
from tf_influence.objective import Objective
from tf_influence.params import ParameterSpace, select_variables, tf_variables


class Problem:
    """A model, a per-example loss, training data and a selection of variables, validated once.

    Args:
      model: a built Keras model (Keras 3 or tf-keras). It is never modified.
      loss: a Keras loss, loss name, callable giving per-example losses, per-output losses of a
        multi-output model (a dict or list, as in `model.compile`), or an `Objective` (then `l2`,
        `training` and `loss_weights` come from it).
      data: training data: `(x, y)` / `(x, y, w)` arrays or a batched `tf.data.Dataset`.
      variables: `None` (all trainable), or layers / layer names / variables (see `select_variables`).
      l2: extra `(l2/2)·‖θ‖²` in the objective.
      training: the `training` flag the model is called with.
      loss_weights: weights of per-output losses (dict or list, as in `model.compile`).
      batch_size: batch size when `data` holds arrays (default 256).
      strategy: a `tf.distribute.Strategy` that data passes split their batches across, or None
        for the strategy whose `scope()` is active (single device outside every scope).
      name: what to call the data in error messages.

    Attributes:
      model, objective, strategy, batch_size.
      batches: the training batches `(x, y, w)` for loops in Python (`data.as_batches`: arrays are
        sliced in memory); `dataset`: the same batches as a `tf.data.Dataset`, for compiled passes.
      first_batch: the data's first `(x, y, w)` batch; `first_outputs`: the model's outputs on it
        (read when the problem was validated).
      variables: the selected variables; `tf_variables`: the `tf.Variable`s behind them.
      space: their `ParameterSpace` (flat coordinates, p = `space.size`, dtype = `space.dtype`).

    Example:
      >>> problem = tfi.Problem(model, "sparse_categorical_crossentropy", (x, y), variables="head")
      >>> problem.space.size, problem.num_examples
      (330, 1200)
    """

    def __init__(self, model, loss, data, variables=None, *, l2=0.0, training=False, batch_size=None,
                 strategy=None, loss_weights=None, name="data"):
        if isinstance(loss, Objective):
            if l2 or training or loss_weights is not None:
                given = "l2" if l2 else "training" if training else "loss_weights"
                raise InputError(f"Pass {given} either in the Objective or to Problem, not both.")
            self.objective = loss
        else:
            self.objective = Objective(model, loss, l2=l2, training=training, loss_weights=loss_weights)
        self.model = model
        self.variables = select_variables(model, variables)
        self.tf_variables = tf_variables(self.variables)
        self.space = ParameterSpace(self.variables)
        self.batch_size = batch_size
        self.batches = as_batches(data, batch_size=batch_size, name=name)
        self.first_batch = first_batch(self.batches, name)
        self.first_outputs = self.objective.validate(self.first_batch, name)
        self.warnings = self.objective.check_model(self.first_batch, name, outputs=self.first_outputs)
        self.strategy = resolve_strategy(strategy)
        self._weights = None
        self._data_fingerprint = None

    @property
    def dtype(self):
        return self.space.dtype

    @property
    def dataset(self):
        """The training batches as a `tf.data.Dataset` (built on first use when the data are arrays)."""
        return dataset_of(self.batches)

    @property
    def num_batches(self):
        """The number of training batches; 0 or less when a dataset does not know it (`data.batch_count`)."""
        return batch_count(self.batches)

    def weights(self):
        """`[n]` float64 sample weights of the training examples, in the data's order (read once)."""
        if self._weights is None:
            self._weights = np.concatenate([w.numpy() for _, _, w in self.batches]).astype(np.float64)
        return self._weights

    @property
    def num_examples(self):
        return len(self.weights())

    def batched(self, data, name="test"):
        """Other data (e.g. test points) as validated batches like the training data's (`data.as_batches`)."""
        batches = as_batches(data, batch_size=self.batch_size, name=name)
        self.objective.validate(first_batch(batches, name), name)
        return batches

    def fingerprint(self):
        """`model_fingerprint(self.model)`: changes whenever any weight of the model changes."""
        return model_fingerprint(self.model)

    def data_fingerprint(self):
        """SHA-256 of the training examples (x, y, w of each, in order), computed once by one streamed pass.

        With the model's fingerprint and the settings it identifies what a result was computed
        from: `score_to_file` and saved factors refuse to reuse results when it changed (e.g.
        corrected labels of the same shape). It does not depend on the batching (`batch_sizes`).
        """
        if self._data_fingerprint is None:
            self._data_fingerprint = data_fingerprint(self.batches, with_sizes=True)
        return self._data_fingerprint[0]

    def check_data_unchanged(self, fingerprint):
        """Compares a `Fingerprint` streamed during a full pass over the training data with the first one.

        The first full pass records it; a later pass that read other data (a generator or files
        behind the dataset changed) is an `InputError`, since results computed from both would mix.
        """
        if self._data_fingerprint is None:
            self._data_fingerprint = (fingerprint.hexdigest(), list(fingerprint.sizes))
        elif fingerprint.hexdigest() != self._data_fingerprint[0]:
            raise InputError(
                "The training data changed between two passes over it (the generator, list or files behind the "
                "dataset now yield other examples): the prepared curvature and cached results belong to the old "
                "data, so the scores would mix both. Build a new Influence after changing the data.")

    def batch_sizes(self):
        """The number of examples in each batch of the training data (read with `data_fingerprint`)."""
        self.data_fingerprint()
        return list(self._data_fingerprint[1])

    def compiled_key(self):
        """`(identity, options)` of the traced graphs of this problem's objective and variables.

        For `tf_influence.compiled.shared_function`: the objective's key (model, loss, training,
        l2), the selected variables and the strategy by identity, and the parameter dtype. Equal for
        two problems built from the same model, loss and variables, whatever their data.
        """
        identity, options = self.objective.compiled_key()
        identity = identity + list(self.variables) + list(self.tf_variables) + (
            [self.strategy] if self.strategy is not None else [])
        return identity, options + (len(self.variables), self.space.dtype.name)

    def settings_fingerprint(self):
        """What the objective is, besides weights and data: loss, l2, training flag, selected variables."""
        objective = self.objective
        variables = [(getattr(v, "path", None) or v.name, tuple(int(d) for d in v.shape)) for v in self.variables]
        return repr((str(objective.loss_name), objective.l2, bool(objective.training), variables))


def model_fingerprint(model):
    """SHA-256 of the shapes, dtypes and values of every weight of `model` (names excluded)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        value = np.asarray(tf.convert_to_tensor(weight).numpy())
        digest.update(f"{value.shape}{value.dtype}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()
