"""One model for every library: digits data, a float64 Keras MLP, its exact PyTorch twin, ground truth.

Shared by `peers.py` (tf_influence vs pyDVL vs kronfluence) and any later benchmark that compares
against PyTorch libraries on the identical trained model. TensorFlow/Keras are always needed;
PyTorch only for `torch_mlp_from_keras`, `check_logits` and `torch_truth` (imported lazily).

Conventions (those of tf_influence): R(θ) = mean_i ℓ(z_i, θ) (softmax cross-entropy on logits, no
regularisers), H = ∇²R, g_i = ∇ℓ(z_i, θ), and

    score[t, i] = g_tᵀ (H + λI)⁻¹ g_i          (positive = helpful)

Flat parameter orders differ: Keras stores a Dense kernel as [in, out] and lists kernel then bias
per layer; torch stores Linear.weight as [out, in]. `keras_to_torch_permutation` maps one to the
other (torch_flat = keras_flat[perm]).

Example:
  >>> data = digits(n_train=1200, n_test=50)
  >>> model = train_mlp((64, 32, 10), data["x_train"], data["y_train"])
  >>> twin = torch_mlp_from_keras(model)
  >>> check_logits(model, twin, data["x_test"])      # raises above 1e-10
  >>> truth = keras_truth(model, data, damping=0.01)  # exact scores [n_test, n_train]
"""

import keras
import numpy as np
import tensorflow as tf

LOGIT_TOLERANCE = 1e-10
_ACTIVATIONS = ("tanh", "relu", "linear")


def loss_fn():
    """The one loss: per-example softmax cross-entropy on logits (Keras)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def digits(n_train=1200, n_test=50, n_large=1000, seed=0):
    """scikit-learn's bundled digits (no download), /16, shuffled with `seed`, float64.

    Returns a dict: x_train, y_train (first n_train), x_test, y_test (the next n_test), and
    x_large, y_large: n_large query points for the at-scale rows — all held-out examples (597
    when n_train=1200) followed by training examples to make up the count (digits has only
    1,797 images; scoring a training example against the training set is legitimate).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float64), y[order].astype(np.int64)
    if n_train + n_test > len(x):
        raise ValueError(f"digits has {len(x)} examples; n_train + n_test = {n_train + n_test} is too many.")
    held_out = np.arange(n_train, len(x))
    large = np.concatenate([held_out, np.arange(n_train)])[:n_large]
    return dict(x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:n_train + n_test],
                y_test=y[n_train:n_train + n_test], x_large=x[large], y_large=y[large])


def mlp(widths, activation="tanh"):
    """Float64 Keras MLP: Dense layers of `widths[1:]` on `widths[0]` inputs, logits output."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}. Received: {activation!r}.")
    layers = [keras.Input((widths[0],), dtype="float64")]
    for i, width in enumerate(widths[1:]):
        last = i == len(widths) - 2
        layers.append(keras.layers.Dense(width, activation=None if last else activation, dtype="float64"))
    return keras.Sequential(layers)


def train_mlp(widths, x, y, *, activation="tanh", epochs=100, batch_size=32, learning_rate=1e-3, seed=0):
    """`mlp(widths)` trained with Adam on (x, y) from a fixed seed; no regularisers."""
    keras.utils.set_random_seed(seed)
    model = mlp(widths, activation)
    model.compile(keras.optimizers.Adam(learning_rate), loss_fn())
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True)
    return model


def num_parameters(model):
    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


# -- Keras -> PyTorch ---------------------------------------------------------------------------


def torch_mlp_from_keras(model):
    """An identical float64 `torch.nn.Sequential` (Linear + activation modules) with copied weights.

    Keras kernels [in, out] become torch weights [out, in]. Only Dense chains with tanh / relu /
    linear activations are supported (what the benchmarks use).
    """
    import torch

    modules = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Dense):
            raise TypeError(f"Only Dense layers are exported; received {type(layer).__name__} ({layer.name}).")
        kernel, bias = (np.asarray(w, np.float64) for w in layer.get_weights())
        linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1], dtype=torch.float64)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        modules.append(linear)
        name = keras.activations.serialize(layer.activation)
        name = name if isinstance(name, str) else name.get("config", {}).get("name", name)
        if name == "tanh":
            modules.append(torch.nn.Tanh())
        elif name == "relu":
            modules.append(torch.nn.ReLU())
        elif name != "linear":
            raise ValueError(f"Activation {name!r} of layer {layer.name} is not exported; use {_ACTIVATIONS}.")
    return torch.nn.Sequential(*modules)


def check_logits(model, torch_model, x, tolerance=LOGIT_TOLERANCE):
    """Max |keras logits − torch logits| on x; raises RuntimeError above `tolerance`."""
    import torch

    keras_logits = np.asarray(model(x, training=False), np.float64)
    with torch.no_grad():
        torch_logits = torch_model(torch.from_numpy(np.asarray(x, np.float64))).numpy()
    diff = float(np.max(np.abs(keras_logits - torch_logits)))
    if not diff <= tolerance:
        raise RuntimeError(f"Keras and torch logits differ by {diff:.3e} > {tolerance:g}: the weight export is wrong.")
    return diff


def keras_to_torch_permutation(model):
    """Index array `perm` with torch_flat = keras_flat[perm] (flat = parameters concatenated)."""
    keras_offsets, offset = [], 0
    for layer in model.layers:
        kernel_shape = tuple(layer.kernel.shape)
        keras_offsets.append((offset, kernel_shape))
        offset += int(np.prod(kernel_shape)) + kernel_shape[1]
    perm = []
    for start, (n_in, n_out) in keras_offsets:
        kernel = start + np.arange(n_in * n_out).reshape(n_in, n_out)
        perm.append(kernel.T.ravel())                                  # weight [out, in]
        perm.append(start + n_in * n_out + np.arange(n_out))          # bias
    return np.concatenate(perm)


# -- Ground truth -------------------------------------------------------------------------------


def keras_hessian(model, x, y, chunk=300):
    """Dense Hessian [p, p] of the mean training loss by nested GradientTapes (float64), Keras order.

    Summed over chunks of `chunk` examples to bound memory."""
    variables = model.trainable_variables
    total = None
    for start in range(0, len(x), chunk):
        xb, yb = tf.constant(x[start:start + chunk]), tf.constant(y[start:start + chunk])
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(_float64_losses(yb, model(xb, training=False)))
            grads = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
        blocks = outer.jacobian(grads, variables, experimental_use_pfor=True)
        part = tf.concat([tf.reshape(b, [grads.shape[0], -1]) for b in blocks], 1).numpy()
        total = part if total is None else total + part
    hessian = total / len(x)
    return 0.5 * (hessian + hessian.T)


def keras_gradients(model, x, y):
    """Per-example loss gradients [n, p] (float64), Keras order."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        losses = _float64_losses(tf.constant(y), model(tf.constant(x), training=False))
    jac = tape.jacobian(losses, variables, experimental_use_pfor=True)
    return tf.concat([tf.reshape(j, [len(x), -1]) for j in jac], 1).numpy()


def _float64_losses(y, logits):
    # The functional form: a Keras Loss *instance* casts to floatx (float32) when called.
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def exact_scores(hessian, g_test, g_train, damping):
    """g_test (H + λI)⁻¹ g_trainᵀ by a dense float64 solve."""
    system = hessian + damping * np.eye(hessian.shape[0])
    return g_test @ np.linalg.solve(system, g_train.T)


def torch_hessian_and_gradients(torch_model, x, y, x_test, y_test, chunk=300):
    """(H, g_train, g_test) from torch.func in torch's flat order: an independent second truth."""
    import torch

    names = [n for n, _ in torch_model.named_parameters()]
    params = {n: p.detach() for n, p in torch_model.named_parameters()}
    shapes = [params[n].shape for n in names]
    sizes = [int(np.prod(s)) for s in shapes]

    def unflat(flat):
        return {n: t.reshape(s) for n, t, s in zip(names, torch.split(flat, sizes), shapes)}

    def mean_loss(flat, xb, yb):
        logits = torch.func.functional_call(torch_model, unflat(flat), (xb,))
        return torch.nn.functional.cross_entropy(logits, yb)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    hessian = sum(len(xb) * torch.func.hessian(mean_loss)(flat, xb, yb).numpy()  # chunks bound memory
                  for xb, yb in zip(torch.split(tx, chunk), torch.split(ty, chunk))) / len(x)
    per_example = torch.func.vmap(torch.func.grad(lambda f, xi, yi: mean_loss(f, xi[None], yi[None])),
                                  in_dims=(None, 0, 0))
    g_train = per_example(flat, tx, ty).numpy()
    g_test = per_example(flat, torch.from_numpy(x_test), torch.from_numpy(y_test)).numpy()
    return 0.5 * (hessian + hessian.T), g_train, g_test


def compare(scores, truth):
    """(Pearson, max relative error = max|s − t| / max|t|) of a score matrix against the truth."""
    scores = np.asarray(scores, np.float64)
    if scores.shape != truth.shape or not np.all(np.isfinite(scores)):
        return float("nan"), float("nan")
    pearson = float(np.corrcoef(scores.ravel(), truth.ravel())[0, 1])
    return pearson, float(np.max(np.abs(scores - truth)) / np.max(np.abs(truth)))
