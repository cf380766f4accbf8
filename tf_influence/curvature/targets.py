"""Output-space vectors whose back-propagation gives the Fisher / Gauss-Newton statistics.

For per-example outputs `f` and a vector `u` per example, back-propagating `u` through the network
gives `g = J_zᵀ u` at every layer's pre-activation `z`. A set of vectors `u_s` with per-example
weights `c_s` is a valid "target" for a curvature `C = Σ_i w_i J_iᵀ M_i J_i / Σ_i w_i` when
`E[Σ_s c_s u_s u_sᵀ] = M_i`:

  fisher="true"      M_i = Fisher of the model's predictive distribution: labels ŷ ~ p(y | x_i)
                     (seeded), `u = √m ∇_f ℓ(ŷ, f)`. For cross-entropy with logits outputs and for
                     MSE this is the Gauss-Newton matrix in expectation. (`m` corrects the losses
                     that average m independent terms, e.g. MSE over m output units.)
  fisher="empirical" M_i = ∇_f ℓ ∇_f ℓᵀ at the true labels (the empirical Fisher).
  fisher="ggn"       M_i = ∇²_f ℓ exactly: `u_c = √|σ_c| v_c`, `c = sign σ_c` over the eigenpairs of
                     the output Hessian, or `u_c = √p_c (e_c − p)` where it is cross-entropy's
                     `diag(p) − ppᵀ` (checked per batch; no eigendecomposition). One
                     back-propagation per output unit, batched by `layer_rows.py`. This is exactly
                     the `HessianOperator(..., curvature="gauss_newton")` matrix, for any loss.
  fisher="auto"      "ggn" when an example's output has at most `EXACT_MAX_OUTPUTS` entries (classifiers
                     with up to 32 classes, small regressions), else "true" (one sampled label per
                     example: the cost of one backward pass instead of one per output entry, e.g.
                     for language models; a loss the sampler does not know is refused there).

Why the exact expectation is the default for few outputs: one sampled label per example adds noise
to every factor. On a digits MLP (64-32-10, 1,200 examples, benchmarks/ekfac_ablation.py), the
Pearson correlation of EKFAC scores with the exact damped Hessian solve at λ = 0.01 was 0.853 with
one sampled label and 0.896 with the exact expectation, for about 10× the fitting work.

The normalisation (mean over examples, weights `w_i`) is applied by the caller.
"""

import numpy as np
import tensorflow as tf

from tf_influence import distribute
from tf_influence.data import tile_batch
from tf_influence.errors import InputError

_ZERO = tf.UnconnectedGradients.ZERO

FISHER_MODES = ("auto", "true", "empirical", "ggn")
EXACT_MAX_OUTPUTS = 32


def output_targets(objective, outputs, y, *, fisher, num_samples=1, seed=(0, 0)):
    """Vectors `u_s` shaped like `outputs` and weights `c_s` `[N]`, as described in the module doc.

    Args:
      objective: the `Objective` (its per-example loss defines ℓ).
      outputs: the model's outputs `f` for a batch (one tensor).
      y: the batch's labels.
      fisher: "true", "empirical" or "ggn".
      num_samples: label samples per example for fisher="true".
      seed: a stateless seed, shape [2] (vary it per batch).

    Returns:
      `(us, weights)`: lists of equal length.
    """
    f = tf.stop_gradient(tf.convert_to_tensor(outputs))
    ones = tf.ones([tf.shape(f)[0]], f.dtype)
    if fisher == "empirical":
        return [_loss_gradient(objective, y, f)], [ones]
    if fisher == "ggn":
        return _ggn_targets(objective, y, f)
    if fisher == "auto":
        raise InputError("internal: resolve fisher='auto' with resolve_fisher() before computing targets.")
    if fisher == "true":
        sampler = _sampler(objective, f)
        us = []
        for s in range(num_samples):
            sampled = sampler(objective, f, y, tf.stack([seed[0], seed[1] * num_samples + s]))
            scale = tf.cast(tf.sqrt(float(_entries_per_distribution(objective, f))), f.dtype)
            us.append(scale * _loss_gradient(objective, sampled, f))
        return us, [ones / num_samples] * num_samples
    raise InputError(f"Unknown fisher={fisher!r}. Expected one of {FISHER_MODES}.")


def whole_batch_targets(objective, outputs, y, *, fisher, num_samples=1, seed=(0, 0)):
    """`output_targets` for this replica's shard, equal to the single-device ones.

    Inside a replica function `outputs` and `y` are this replica's shard of a batch. Deterministic
    targets (fisher="empirical", "ggn") are per example, computed on the shard. Sampled labels
    (fisher="true") come from one stateless draw over the whole batch on a single device, so the
    outputs of every shard are gathered, labels drawn for the whole batch with the same seed, and
    the targets cut to this shard. Returns `(us, weights)` as `output_targets` does.
    """
    if fisher != "true":
        return output_targets(objective, outputs, y, fisher=fisher, num_samples=num_samples, seed=seed)
    whole, start, stop = distribute.gather_batch(tf.stop_gradient(tf.convert_to_tensor(outputs)))
    # The samplers read only the labels' shape and dtype, never their values.
    whole_y = tf.zeros(tf.concat([tf.shape(whole)[:1], tf.shape(y)[1:]], 0), y.dtype)
    us, weights = output_targets(objective, whole, whole_y, fisher=fisher, num_samples=num_samples, seed=seed)
    return [u[start:stop] for u in us], [c[start:stop] for c in weights]


def check_outputs(objective, outputs, fisher):
    """Raises `InputError` early when `fisher` cannot be used with this model's outputs and loss."""
    if isinstance(outputs, (list, tuple, dict)):
        raise InputError(
            f"KFAC/EKFAC supports models with one output tensor. Received outputs of structure "
            f"{tf.nest.map_structure(lambda t: tuple(t.shape), outputs)}."
        )
    fisher = resolve_fisher(objective, outputs, fisher)
    if fisher == "true":
        _sampler(objective, outputs)


def output_entries(outputs):
    """Entries per example of a batch of outputs (static): the C of the exact expectation."""
    entries = 1
    for d in outputs.shape[1:]:
        if d is None:
            raise InputError(f"The model's outputs have an unknown dimension (shape {tuple(outputs.shape)}); "
                             "KFAC/EKFAC need a static output shape per example.")
        entries *= int(d)
    return entries


def resolve_fisher(objective, outputs, fisher):
    """The mode to use: `fisher` itself, or for "auto" the exact "ggn" when an example's output has
    at most `EXACT_MAX_OUTPUTS` entries, else "true" (whose sampler refuses a loss it does not know,
    saying to choose a mode, rather than silently running one back-propagation per output entry)."""
    if fisher != "auto":
        return fisher
    if any(d is None for d in outputs.shape[1:]):  # e.g. sequences of any length: sample
        return "true"
    return "ggn" if output_entries(outputs) <= EXACT_MAX_OUTPUTS else "true"


def resolve_targets(objective, outputs, fisher, num_samples=1):
    """`(fisher, num_targets)` for a fit: `fisher` checked against the outputs (`check_outputs`) and resolved
    (`resolve_fisher`), and the targets per example it gives (`target_count`)."""
    check_outputs(objective, outputs, fisher)
    fisher = resolve_fisher(objective, outputs, fisher)
    return fisher, target_count(objective, outputs, fisher, num_samples)


def target_count(objective, outputs, fisher, num_samples=1):
    """How many output targets `output_targets` returns per example for a resolved `fisher`."""
    fisher = resolve_fisher(objective, outputs, fisher)
    if fisher == "ggn":
        return output_entries(outputs)
    return num_samples if fisher == "true" else 1


def _loss_gradient(objective, y, f):
    with tf.GradientTape() as tape:
        tape.watch(f)
        loss = tf.reduce_sum(objective.per_example_loss(y, f))
    return tape.gradient(loss, f)


def _ggn_targets(objective, y, f):
    n = tf.shape(f)[0]
    k = output_entries(f)
    # Row c of every example's output Hessian is the gradient of Σ_i ∂ℓ_i/∂f_ic (examples are
    # independent). All k rows come from ONE backward pass over the outputs tiled k times, copy c
    # differentiating entry c: k separate passes traced ~6x slower, a pfor batch_jacobian slower still.
    tiled_f, tiled_y = tile_batch((f, y), k)
    with tf.GradientTape() as outer:
        outer.watch(tiled_f)
        grad = tf.reshape(_loss_gradient(objective, tiled_y, tiled_f), [k, n, k])
        diagonal = tf.reduce_sum(grad * tf.eye(k, dtype=grad.dtype)[:, tf.newaxis, :])
    rows = tf.reshape(outer.gradient(diagonal, tiled_f, unconnected_gradients=_ZERO), [k, n, k])
    hessian = tf.transpose(rows, [1, 0, 2])
    hessian = 0.5 * (hessian + tf.linalg.matrix_transpose(hessian))
    p = tf.nn.softmax(tf.reshape(f, [n, k]))
    softmax_hessian = tf.linalg.diag(p) - p[:, :, tf.newaxis] * p[:, tf.newaxis, :]
    tolerance = 64 * np.finfo(f.dtype.as_numpy_dtype).eps * (1 + tf.reduce_max(tf.abs(hessian)))
    is_softmax = tf.reduce_all(tf.abs(hessian - softmax_hessian) <= tolerance)
    us, weights = tf.cond(is_softmax, lambda: _softmax_factor(p), lambda: _eigen_factor(hessian))
    return [tf.reshape(u, tf.shape(f)) for u in tf.unstack(us, axis=1)], tf.unstack(weights, axis=1)


def _softmax_factor(p):
    """`diag(p) − ppᵀ = Σ_c u_c u_cᵀ` with `u_c = √p_c (e_c − p)` (as `Σ p_c = 1`): the output Hessian of
    cross-entropy on logits, factored without an eigendecomposition. `([n, k, k], [n, k])`, targets on axis 1."""
    k = p.shape[-1]
    us = tf.sqrt(p)[:, :, tf.newaxis] * (tf.eye(k, dtype=p.dtype)[tf.newaxis] - p[:, tf.newaxis, :])
    return us, tf.ones_like(p)


def _eigen_factor(hessian):
    """`H = Σ_c sign(σ_c) u_c u_cᵀ`, `u_c = √|σ_c| v_c` over the eigenpairs: any symmetric output Hessian."""
    eigenvalues, eigenvectors = tf.linalg.eigh(hessian)
    us = tf.linalg.matrix_transpose(eigenvectors) * tf.sqrt(tf.abs(eigenvalues))[:, :, tf.newaxis]
    return us, tf.sign(eigenvalues)


def _loss_key(objective):
    return str(objective.loss_name).lower().replace("_", "")


def _sampler(objective, f):
    key = _loss_key(objective)
    rank = f.shape.rank
    if "sparsecategoricalcrossentropy" in key or "categoricalcrossentropy" in key:
        if rank != 2:
            raise InputError(
                f"fisher='true' samples one class per example and needs outputs of shape [batch, "
                f"classes]; received outputs of shape {tuple(f.shape)}. Use fisher='ggn' (exact "
                "Gauss-Newton) or fisher='empirical'."
            )
        return _sample_categorical
    if "binarycrossentropy" in key:
        return _sample_bernoulli
    if key in ("mse", "meansquarederror"):
        return _sample_gaussian
    raise InputError(
        f"fisher='true' samples labels from the model's predictive distribution, known for "
        f"(sparse_)categorical_crossentropy, binary_crossentropy and mse. Received loss "
        f"{objective.loss_name!r}. Use fisher='ggn' (exact Gauss-Newton, any loss) or "
        "fisher='empirical' (true labels)."
    )


def _entries_per_distribution(objective, f):
    """How many independent likelihood terms the per-example loss averages (m)."""
    if "categoricalcrossentropy" in _loss_key(objective):
        return 1
    m = 1
    for d in f.shape[1:]:
        m *= int(d)
    return m


def _sample_categorical(objective, f, y, seed):
    """ŷ ~ softmax(−ℓ(c, f)) over classes c: the model's distribution, for logits or probabilities."""
    num_classes = int(f.shape[-1])
    sparse = "sparse" in _loss_key(objective)

    def label(c):
        if sparse:
            return tf.fill(tf.shape(y), tf.cast(c, y.dtype))
        return tf.one_hot(tf.fill(tf.shape(f)[:1], c), num_classes, dtype=y.dtype)

    losses = tf.map_fn(lambda c: objective.per_example_loss(label(c), f), tf.range(num_classes),
                       fn_output_signature=f.dtype)
    logits = tf.cast(-tf.transpose(losses), tf.float64)
    classes = tf.random.stateless_categorical(logits, 1, seed, dtype=tf.int32)[:, 0]
    if sparse:
        return tf.reshape(tf.cast(classes, y.dtype), tf.shape(y))
    return tf.one_hot(classes, num_classes, dtype=y.dtype)


def _sample_bernoulli(objective, f, y, seed):
    """ŷ ~ Bernoulli(q) per unit; the loss is linear in y, so `logit(q) = −m ∂ℓ/∂y`."""
    y_float = tf.cast(tf.zeros_like(f), f.dtype)
    with tf.GradientTape() as tape:
        tape.watch(y_float)
        loss = tf.reduce_sum(objective.per_example_loss(y_float, f))
    logits = -float(_entries_per_distribution(objective, f)) * tape.gradient(loss, y_float)
    u = tf.random.stateless_uniform(tf.shape(f), seed, dtype=f.dtype)
    return tf.cast(u < tf.sigmoid(logits), f.dtype)


def _sample_gaussian(objective, f, y, seed):
    """ŷ = f + ε, ε ~ N(0, ½): the density exp(−(y − f)²) that MSE is the negative log of."""
    return f + tf.sqrt(tf.constant(0.5, f.dtype)) * tf.random.stateless_normal(tf.shape(f), seed, dtype=f.dtype)
