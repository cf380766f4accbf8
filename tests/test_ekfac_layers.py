"""KFAC/EKFAC for the layer kinds beyond Dense and Conv2D, by brute force (float64, weighted data).

For each kind, with the empirical Fisher (per-example gradients Gᵢ of the layer's variables from an
independent tape jacobian, mapped by hand to the block's matrices `[G, d_a, d_g]` as derived in
docs/mathematics.md):
  (1) the captured rows reproduce every Gᵢ: `Σ_t a_t g_tᵀ` per group;
  (2) A and S are the KFC statistics of those rows, Λ* = Σᵢ wᵢ (Q_Aᵀ Gᵢ Q_S)² / W;
  (3) the dense EKFAC block equals `(Q_A ⊗ Q_S) diag(Λ*) (Q_A ⊗ Q_S)ᵀ` per group, mapped back by hand.
Elementwise parameters (normalisation scale/offset, PReLU alpha, a transposed convolution's bias)
have exact blocks: with fisher="ggn" they equal the exact Gauss-Newton block of `HessianOperator`.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tf_influence.curvature import find_blocks, fit_factors, layer_rows
from tf_influence.operators import EKFACOperator

CE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
L = keras.layers
N = 9


def _kernel_matrices(kernel, bias, groups, depthwise):
    """Hand mapping of a (grouped) convolution's kernel `[*k, c_in/G, c_out]` (depthwise: `[*k, C, m]`, G = C)
    and bias to per-group matrices `[G, d_a, d_g]`: kernel rows in (k, c_in/G) order, then the bias."""
    out = kernel.shape[-1] if depthwise else kernel.shape[-1] // groups
    mats = []
    for g in range(groups):
        k = kernel[..., g, :] if depthwise else kernel[..., g * out:(g + 1) * out]
        k = k.reshape(-1, out)
        rows = [k] if bias is None else [k, bias.reshape(groups, out)[g][np.newaxis]]
        mats.append(np.vstack(rows))
    return np.stack(mats)


def _to_matrices(kind, layer, parts):
    """The block's matrices `[G, d_a, d_g]` from its variables' values (by hand, from the kernel shapes)."""
    if kind == "transposed":  # kernel [*k, c_out, c_in] -> [c_in, k·c_out]
        kernel = parts[0]
        return kernel.reshape(-1, kernel.shape[-1]).T[np.newaxis]
    if kind == "depthwise_of_separable":
        return _kernel_matrices(parts[0], None, parts[0].shape[-2], True)
    if kind == "elementwise":
        return np.concatenate([p.ravel() for p in parts])[np.newaxis, np.newaxis]
    depthwise = "Depthwise" in type(layer).__name__
    groups = parts[0].shape[-2] if depthwise else getattr(layer, "groups", 1)
    return _kernel_matrices(parts[0], parts[1] if len(parts) > 1 else None, groups, depthwise)


def _from_matrices(kind, layer, mats, shapes):
    """The inverse of `_to_matrices` on a basis: flat vector from per-group matrices."""
    sizes = [int(np.prod(s)) for s in shapes]
    flat = np.zeros(sum(sizes))
    for j in range(len(flat)):
        e = np.zeros(sum(sizes))
        e[j] = 1.0
        parts = [p.reshape(s) for p, s in zip(np.split(e, np.cumsum(sizes)[:-1]), shapes)]
        flat[j] = np.sum(_to_matrices(kind, layer, parts) * mats)
    return flat


CASES = {
    "depthwise": ((5, 5, 2), lambda: L.DepthwiseConv2D(2, depth_multiplier=2, activation="tanh"), "conv"),
    "depthwise_1d": ((7, 3), lambda: L.DepthwiseConv1D(3, strides=2, padding="same", activation="tanh"), "conv"),
    "grouped": ((4, 4, 4), lambda: L.Conv2D(4, 2, groups=2, activation="tanh"), "conv"),
    "separable": ((5, 5, 2), lambda: L.SeparableConv2D(3, 2, depth_multiplier=2, activation="tanh"),
                  "depthwise_of_separable"),
    "transposed_2d": ((3, 3, 2), lambda: L.Conv2DTranspose(2, 3, strides=2, padding="same", activation="tanh"),
                      "transposed"),
    "transposed_1d": ((4, 2), lambda: L.Conv1DTranspose(2, 3, strides=2, activation="tanh"), "transposed"),
    "transposed_3d": ((2, 2, 2, 2), lambda: L.Conv3DTranspose(2, 2, strides=(1, 2, 1), activation="tanh"),
                      "transposed"),
    "conv_3d": ((3, 4, 3, 2), lambda: L.Conv3D(2, (2, 3, 2), strides=2, padding="same", activation="tanh"), "conv"),
}


def _model(shape, make):
    inputs = keras.Input(shape)
    layer = make()
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(layer(inputs))))
    return model, layer


def _per_example(objective, variables, x, y):
    with tf.GradientTape(persistent=True) as tape:
        losses = objective.per_example_loss(y, objective.outputs(x))
    jacobian = tape.jacobian(losses, [v.value for v in variables], experimental_use_pfor=False)
    return [j.numpy() for j in jacobian]


@pytest.mark.parametrize("name", list(CASES))
def test_kronecker_blocks_by_brute_force(float64, rng, name):
    shape, make, kind = CASES[name]
    model, layer = _model(shape, make)
    for v in model.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    x, y, w = rng.standard_normal((N, *shape)), rng.integers(0, 3, N), rng.uniform(0.5, 2.0, N)
    objective = tfi.Objective(model, CE_LOGITS)
    blocks = find_blocks(model, model.trainable_variables)
    block = blocks[0]
    variables = block.variables
    assert block.kind == {"depthwise_of_separable": "conv"}.get(kind, kind) and block.layer is layer
    problem = tfi.Problem(model, objective, (x, y, w), variables=variables, batch_size=4)
    factors = fit_factors(problem, fisher="empirical")
    per_example = _per_example(objective, variables, x, y)
    G = np.stack([_to_matrices(kind, layer, [p[i] for p in per_example]) for i in range(N)])  # [N, G, d_a, d_g]

    (a, gs), = layer_rows(objective, [block], tf.constant(x), tf.constant(y), fisher="empirical")
    a, g = a.numpy(), gs[0][0].numpy()
    if a.ndim == 3:
        a, g = a[:, :, np.newaxis], g[:, :, np.newaxis]
    np.testing.assert_allclose(np.einsum("ntgk,ntgl->ngkl", a, g), G, rtol=1e-10, atol=1e-13)  # (1)

    positions = a.shape[1]
    a_expected = np.einsum("n,ntgk,ntgl->gkl", w, a, a) / (positions * w.sum())
    s_expected = np.einsum("n,ntgk,ntgl->gkl", w, g, g) / w.sum()
    f = factors.layers[0]
    grouped = f.q_s.shape.rank == 3
    q_a, e_a, q_s, e_s = (t.numpy() if grouped else t.numpy()[np.newaxis] for t in (f.q_a, f.eig_a, f.q_s, f.eig_s))
    np.testing.assert_allclose(np.einsum("gij,gj,gkj->gik", q_a, e_a, q_a), a_expected, rtol=1e-9,
                               atol=1e-12 * np.abs(a_expected).max())  # (2)
    np.testing.assert_allclose(np.einsum("gij,gj,gkj->gik", q_s, e_s, q_s), s_expected, rtol=1e-9,
                               atol=1e-12 * np.abs(s_expected).max())
    projected = np.einsum("gka,ngkl,glb->ngab", q_a, G, q_s)
    corrected = np.einsum("n,ngab->gab", w, projected ** 2) / w.sum()
    np.testing.assert_allclose(np.reshape(f.corrected.numpy(), corrected.shape), corrected, rtol=1e-9,
                               atol=1e-13 * corrected.max())

    damping = 0.5
    op = EKFACOperator(factors, damping=damping)
    dense = op.to_dense().numpy() - damping * np.eye(op.shape[-1])
    shapes = [tuple(v.shape) for v in variables]
    expected = np.stack([  # (3): column j = the hand-built EKFAC product on the j-th basis vector
        _from_matrices(kind, layer, np.einsum("gka,gab,glb->gkl", q_a, corrected * np.einsum(
            "gka,gkl,glb->gab", q_a, _to_matrices(kind, layer, [p.reshape(s) for p, s in zip(
                np.split(np.eye(op.shape[-1])[j], np.cumsum([int(np.prod(s)) for s in shapes])[:-1]), shapes)]),
            q_s), q_s), shapes)
        for j in range(op.shape[-1])], axis=1)
    np.testing.assert_allclose(dense, expected, rtol=1e-9, atol=1e-12 * np.abs(expected).max())


ELEMENTWISE = {
    "layer_norm": ((4, 3), lambda: L.LayerNormalization(axis=[1, 2]), False),
    "batch_norm": ((4, 3), lambda: L.BatchNormalization(axis=1), False),
    "batch_norm_training": ((5,), lambda: L.BatchNormalization(), True),
    "group_norm": ((3, 3, 4), lambda: L.GroupNormalization(2), False),
    "prelu": ((4, 3), lambda: L.PReLU(shared_axes=[1]), False),
    "rms_norm": ((5,), lambda: L.RMSNormalization(), False),
    "transposed_bias": ((3, 3, 2), lambda: L.Conv2DTranspose(2, 2, activation="tanh"), False),
    "layer_norm_diagonal": ((520,), lambda: L.LayerNormalization(), False),  # 1040 > DENSE_LIMIT parameters
}


@pytest.mark.parametrize("name", list(ELEMENTWISE))
def test_elementwise_blocks_are_the_exact_gauss_newton_and_empirical_fisher_blocks(float64, rng, name):
    """fisher="ggn": the block equals the exact Gauss-Newton block of the layer's parameters (the diagonal
    of it beyond DENSE_LIMIT parameters); fisher="empirical": Σᵢ wᵢ gᵢgᵢᵀ / W from independent gradients.
    In training mode (BatchNormalization) the batch is one, as the Gauss-Newton operator's."""
    shape, make, training = ELEMENTWISE[name]
    inputs = keras.Input(shape)
    layer = make()
    h = layer(L.Dense(shape[-1], activation="tanh")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(h)))
    for v in model.trainable_variables:
        v.assign(v + 0.3 * rng.standard_normal(v.shape))
    x, y, w = rng.standard_normal((N, *shape)), rng.integers(0, 3, N), rng.uniform(0.5, 2.0, N)
    params = [v for v in layer.trainable_weights if name != "transposed_bias" or v is layer.bias]
    problem = tfi.Problem(model, CE_LOGITS, (x, y, w), variables=params, training=training,
                          batch_size=N if training else 4)
    factors = fit_factors(problem, fisher="ggn")
    block = factors.blocks[0]
    assert len(factors.blocks) == 1 and block.kind == "elementwise"
    assert block.diagonal == (name == "layer_norm_diagonal")
    p = problem.space.size
    approx = EKFACOperator(factors, damping=1.0).to_dense().numpy() - np.eye(p)
    gauss_newton = tfi.HessianOperator(problem, curvature="gauss_newton")
    if block.diagonal:  # 64 columns of the exact block: their diagonal entries (the rest of the block is 0)
        columns = np.arange(0, p, p // 64)[:64]
        exact = gauss_newton.matmul_rows(np.eye(p)[columns]).numpy()[np.arange(len(columns)), columns]
        assert np.count_nonzero(approx - np.diag(np.diag(approx))) == 0
        approx = np.diag(approx)[columns]
    else:
        exact = gauss_newton.to_dense().numpy()
    np.testing.assert_allclose(approx, exact, rtol=1e-9, atol=1e-12 * np.abs(exact).max())
    if training:
        return
    empirical = EKFACOperator(fit_factors(problem, fisher="empirical"), damping=1.0).to_dense().numpy()
    grads = np.concatenate([p.reshape(N, -1) for p in _per_example(problem.objective, params, x, y)], axis=1)
    expected = np.einsum("n,nk,nl->kl", w, grads, grads) / w.sum()
    if block.diagonal:
        expected = np.diag(np.diag(expected))
    np.testing.assert_allclose(empirical - np.eye(len(expected)), expected, rtol=1e-9,
                               atol=1e-12 * np.abs(expected).max())
