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
                     the output Hessian (one backward pass per output unit). This is exactly the
                     `HessianOperator(..., curvature="gauss_newton")` matrix, for any loss.

The normalisation (mean over examples, weights `w_i`) is applied by the caller.
"""

import tensorflow as tf

from tf_influence import distribute
from tf_influence.errors import InputError

FISHER_MODES = ("true", "empirical", "ggn")


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
    if fisher == "true":
        _sampler(objective, outputs)


def _loss_gradient(objective, y, f):
    with tf.GradientTape() as tape:
        tape.watch(f)
        loss = tf.reduce_sum(objective.per_example_loss(y, f))
    return tape.gradient(loss, f)


def _ggn_targets(objective, y, f):
    n = tf.shape(f)[0]
    k = 1
    for d in f.shape[1:]:
        k *= int(d)
    with tf.GradientTape() as outer:
        outer.watch(f)
        grad = _loss_gradient(objective, y, f)
    hessian = tf.reshape(outer.batch_jacobian(grad, f), [n, k, k])
    hessian = 0.5 * (hessian + tf.linalg.matrix_transpose(hessian))
    eigenvalues, eigenvectors = tf.linalg.eigh(hessian)
    us, weights = [], []
    for c in range(k):
        scaled = eigenvectors[:, :, c] * tf.sqrt(tf.abs(eigenvalues[:, c]))[:, tf.newaxis]
        us.append(tf.reshape(scaled, tf.shape(f)))
        weights.append(tf.sign(eigenvalues[:, c]))
    return us, weights


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
