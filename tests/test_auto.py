"""`method="auto"`: the planner's choices, its fallback, `Influence.plan`, and the iterative-cost announcement.

Every solution auto returns is checked against a dense float64 solve with the nested-tape Hessian
(tests/helpers.py), so a choice is never only asserted by name.
"""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import models
from tests.helpers import dense_hessian, dense_operator, relative_error
from tf_influence.curvature.targets import EXACT_MAX_OUTPUTS
from tf_influence.operators.source import CurvatureSource
from tf_influence.solvers import Auto, plan_routes
from tf_influence.solvers.direct import Direct

DAMPING = 0.05


def _sce():
    """Built inside each test, after the float64 fixture: a loss built under float32 computes in float32."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _gauss_newton(model, x, variables):
    """Mean of Jᵢᵀ (diag(sᵢ) − sᵢsᵢᵀ) Jᵢ for softmax cross-entropy on logits: Jacobians by a tape, in float64."""
    variables = [v if isinstance(v, tf.Variable) else v.value for v in variables]
    with tf.GradientTape(persistent=True) as tape:
        logits = model(x, training=False)
    blocks = tape.jacobian(logits, variables, experimental_use_pfor=False)
    jacobian = tf.concat([tf.reshape(b, [logits.shape[0], logits.shape[1], -1]) for b in blocks], 2).numpy()
    s = tf.nn.softmax(logits).numpy()
    hessians = np.einsum("nc,cd->ncd", s, np.eye(s.shape[1])) - np.einsum("nc,nd->ncd", s, s)
    return np.einsum("nci,ncd,ndj->ij", jacobian, hessians, jacobian) / len(x)


def _reference(model, x, y, variables, rows, damping=DAMPING, gauss_newton=False):
    """`(H + λI)⁻¹ rows` from the nested-tape Hessian (or Gauss-Newton matrix) and a dense solve."""
    hessian = (_gauss_newton(model, x, variables) if gauss_newton else
               dense_hessian(model, _sce(), x, y, variables=variables))
    return np.linalg.solve(hessian + damping * np.eye(len(hessian)), np.asarray(rows).T).T


def _rows(inf, x, y):
    return inf.training_gradients(np.arange(3))


def test_auto_is_the_default_and_picks_direct_for_a_small_head(float64, rng, caplog):
    model = models.mlp()
    x, y = models.classification_data(rng)
    inf = tfi.Influence(model, _sce(), (x, y), variables="head", damping=DAMPING, progress=False)
    assert inf.method == "auto"
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        rows = _rows(inf, x, y)
        solution = inf.solve(rows).numpy()
    assert isinstance(inf.prepared().method, Direct) and inf.prepared().plan.chosen.name == "direct"
    assert any("method='auto' chose direct" in r.getMessage() for r in caplog.records)
    head = model.get_layer("head").trainable_variables
    assert relative_error(solution, _reference(model, x, y, head, rows)) <= 1e-10


def test_plan_lists_every_route_with_estimates_and_marks_the_choice(float64, rng):
    model = models.mlp()
    x, y = models.classification_data(rng)
    inf = tfi.Influence(model, _sce(), (x, y), variables="head", damping=DAMPING, progress=False)
    plan = inf.plan(n_test=10)
    assert [r.name for r in plan.routes] == ["direct", "chain", "cg", "ekfac_refined", "ekfac"]
    p = inf.space.size
    assert plan.p == p and plan.n_train == len(y) and plan.n_test == 10
    assert plan.route("direct").memory_bytes == 3 * p * p * 8
    assert all(r.applicable and r.seconds > 0 for r in plan.routes)
    text = str(plan)
    chosen_line = next(line for line in text.splitlines() if line.lstrip().startswith("*"))
    assert "direct" in chosen_line
    for name in ("direct", "chain", "cg", "ekfac_refined", "ekfac"):
        assert f" {name} " in text
    assert inf.source.built == []  # planning builds nothing


def test_auto_takes_a_non_dense_route_when_the_dense_matrix_does_not_fit(float64, rng):
    model = models.mlp(hidden=5)
    x, y = models.classification_data(rng, n=30)
    p = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    budget = 3 * p * p * 8 // 2  # half of what the dense route needs
    inf = tfi.Influence(model, _sce(), (x, y), damping=DAMPING, curvature="gauss_newton", progress=False,
                        memory_bytes=budget, tol=1e-12)
    plan = inf.plan()
    assert not plan.route("direct").applicable and "memory" in plan.route("direct").note
    rows = _rows(inf, x, y)
    solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name == plan.chosen.name != "direct"
    assert inf.source.built.count("hessian") <= 1 and "dense" not in inf.source.built
    reference = _reference(model, x, y, model.trainable_variables, rows, gauss_newton=True)
    assert relative_error(solution, reference) <= 1e-8


def test_auto_takes_the_chain_route_on_a_deep_dense_chain_when_direct_does_not_fit(float64, rng):
    model = keras.Sequential([keras.Input((3,))] + [keras.layers.Dense(6, activation="tanh") for _ in range(4)]
                             + [keras.layers.Dense(3)])
    x, y = models.classification_data(rng, n=5, d=3)
    options = dict(damping=DAMPING, curvature="gauss_newton", progress=False)
    roomy = tfi.Influence(model, _sce(), (x, y), **options).plan()
    chain, direct = roomy.route("chain"), roomy.route("direct")
    assert chain.applicable and chain.memory_bytes < direct.memory_bytes
    budget = int(np.sqrt(chain.memory_bytes * direct.memory_bytes))  # between the two
    inf = tfi.Influence(model, _sce(), (x, y), memory_bytes=budget, **options)
    rows = _rows(inf, x, y)
    solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name == "chain" and inf.source.built == ["chain"]
    reference = _reference(model, x, y, model.trainable_variables, rows, gauss_newton=True)
    assert relative_error(solution, reference) <= 1e-10


def test_auto_approximates_by_refined_ekfac_when_the_exact_routes_are_over_max_seconds(float64, rng, caplog):
    """Over the time limit, auto's approximate route is EKFAC refined by CG on the exact curvature to a
    relative residual of 0.1: the residual is met and the solution is closer to the exact one than
    one-shot EKFAC's."""
    model = models.mlp()
    x, y = models.classification_data(rng)
    options = dict(damping=DAMPING, curvature="gauss_newton", progress=False, direct_max_size=10,
                   memory_bytes=2**20)  # no direct, no chain
    inf = tfi.Influence(model, _sce(), (x, y), max_seconds=1e-6, **options)
    plan = inf.plan()
    assert not plan.route("direct").applicable and not plan.route("chain").applicable
    assert plan.chosen.name == "ekfac_refined" and "max_seconds" in plan.reason
    rows = _rows(inf, x, y)
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name == "ekfac" and inf.prepared().method.tol == 0.1
    assert any("method='auto' chose ekfac_refined" in r.getMessage() for r in caplog.records)
    hessian = _gauss_newton(model, x, model.trainable_variables) + DAMPING * np.eye(inf.space.size)
    residual = np.linalg.norm(solution @ hessian - rows, axis=1) / np.linalg.norm(rows, axis=1)
    assert residual.max() <= 0.1
    reference = np.linalg.solve(hessian, np.asarray(rows).T).T
    one_shot = tfi.Influence(model, _sce(), (x, y), method="ekfac", **{k: v for k, v in options.items()
                                                                       if k in ("damping", "curvature", "progress")})
    assert relative_error(solution, reference) < relative_error(one_shot.solve(rows).numpy(), reference)
    no_refinement = tfi.Influence(model, _sce(), (x, y), max_seconds=1e-6, refine_tol=None, **options).plan()
    assert not no_refinement.route("ekfac_refined").applicable and no_refinement.chosen.name == "ekfac"


def _layer_norm_model():
    return models.own_layer_norm_mlp()


def test_auto_accepts_a_layer_norm_model_that_only_ekfac_accepts(float64, rng):
    model = _layer_norm_model()
    x, y = models.classification_data(rng, n=30)
    variables = ["hidden", "head"]
    for refused in ("direct", "cg", "chain"):
        named = tfi.Influence(model, _sce(), (x, y), variables=variables, method=refused, damping=DAMPING,
                              progress=False)
        with pytest.raises(tfi.errors.UnsupportedLayerError):
            named.solve(np.ones((1, named.space.size)))
    inf = tfi.Influence(model, _sce(), (x, y), variables=variables, damping=DAMPING, progress=False)
    plan = inf.plan()
    assert [r.name for r in plan.routes if r.applicable] == ["ekfac"] and plan.chosen.name == "ekfac"
    scores = inf.scores((x[:2], y[:2]))
    named = tfi.Influence(model, _sce(), (x, y), variables=variables, method="ekfac", damping=DAMPING, progress=False)
    assert inf.prepared().method.name == "ekfac" and inf.source.built == ["ekfac"]
    np.testing.assert_allclose(scores, named.scores((x[:2], y[:2])), rtol=1e-12, atol=0)


def test_auto_with_gauss_newton_curvature_on_the_layer_norm_model_is_exact(float64, rng):
    model = _layer_norm_model()
    x, y = models.classification_data(rng, n=30)
    inf = tfi.Influence(model, _sce(), (x, y), variables=["hidden", "head"], curvature="gauss_newton",
                        damping=DAMPING, progress=False)
    rows = _rows(inf, x, y)
    solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name == "direct"
    reference = tfi.Influence(model, _sce(), (x, y), variables=["hidden", "head"], curvature="gauss_newton",
                              method="cg", damping=DAMPING, tol=1e-13, progress=False).solve(rows).numpy()
    assert relative_error(solution, reference) <= 1e-9


def test_auto_falls_back_when_preparing_the_chosen_route_fails(float64, rng, caplog, monkeypatch):
    def refuse(self, source):
        raise tfi.errors.ResourceError("simulated: no memory for the dense matrix")

    monkeypatch.setattr(Direct, "prepare", refuse)
    model = models.mlp()
    x, y = models.classification_data(rng)
    inf = tfi.Influence(model, _sce(), (x, y), variables="head", damping=DAMPING, progress=False, tol=1e-12)
    assert inf.plan().chosen.name == "direct"
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        rows = _rows(inf, x, y)
        solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name != "direct" and inf.prepared().method.exact
    assert any("direct cannot be used here" in r.getMessage() and "simulated" in r.getMessage()
               for r in caplog.records)
    head = model.get_layer("head").trainable_variables
    assert relative_error(solution, _reference(model, x, y, head, rows)) <= 1e-8


def test_cg_route_without_ekfac_preconditioner_for_a_loss_ekfac_cannot_sample(float64, rng, caplog):
    def loss(y_true, y_pred):  # a plain callable: CG accepts it, EKFAC cannot sample labels from it
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    # Over EXACT_MAX_OUTPUTS classes EKFAC samples labels (below it, it takes the exact expectation of any loss).
    model = models.mlp(hidden=4, classes=EXACT_MAX_OUTPUTS + 1)
    x, y = models.classification_data(rng, n=25, classes=EXACT_MAX_OUTPUTS + 1)
    p = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    inf = tfi.Influence(model, loss, (x, y), damping=DAMPING, curvature="gauss_newton", progress=False,
                        memory_bytes=p * p * 8, tol=1e-12)
    plan = inf.plan()
    assert plan.chosen.name == "cg" and not plan.route("chain").applicable
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        rows = _rows(inf, x, y)
        solution = inf.solve(rows).numpy()
    assert inf.prepared().method.name == "cg" and inf.prepared().method.preconditioner is None
    assert any("CG without a preconditioner" in r.getMessage() for r in caplog.records)
    reference = _reference(model, x, y, model.trainable_variables, rows, gauss_newton=True)
    assert relative_error(solution, reference) <= 1e-8


def test_auto_refuses_with_every_route_named_when_none_applies(float64, rng):
    def loss(y_true, y_pred):
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    classes = EXACT_MAX_OUTPUTS + 1  # EKFAC samples labels here, and cannot from a plain callable
    model = models.own_layer_norm_mlp(classes=classes)
    x, y = models.classification_data(rng, n=20, classes=classes)
    inf = tfi.Influence(model, loss, (x, y), variables=["hidden", "head"], damping=DAMPING, progress=False)
    with pytest.raises(tfi.errors.InputError, match=r"method='auto' found no route.*ekfac: "):
        inf.solve(np.ones((1, inf.space.size)))


def test_iterative_self_influence_announces_its_cost_and_the_cheaper_route(float64, rng, caplog):
    model = models.mlp()
    x, y = models.classification_data(rng, n=24)
    inf = tfi.Influence(model, _sce(), (x, y), variables="head", method="cg", damping=DAMPING, batch_size=8,
                        progress=False, tol=1e-10)
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        values = inf.self_influence()
    messages = [r.getMessage() for r in caplog.records]
    announcement = next(m for m in messages if m.startswith("self_influence runs"))
    assert "24 cg solves" in announcement and "3 batches" in announcement
    assert "method='direct' would be cheaper" in announcement
    assert any(m.startswith("first batch took") and "ETA" in m for m in messages)
    direct = tfi.Influence(model, _sce(), (x, y), variables="head", method="direct", damping=DAMPING, batch_size=8,
                           progress=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tf_influence"):
        reference = direct.self_influence()
    assert not any(r.getMessage().startswith("self_influence runs") for r in caplog.records)
    assert relative_error(values, reference) <= 1e-8


def test_plan_routes_on_a_bare_operator_and_auto_through_inverse_hvp(rng):
    matrix = rng.standard_normal((6, 6))
    matrix = matrix @ matrix.T + 6 * np.eye(6)
    operator = dense_operator(matrix)
    b = rng.standard_normal((2, 6))
    x, info = tfi.inverse_hvp(operator, b, method="auto")
    assert info.method == "direct"
    assert relative_error(x.numpy(), np.linalg.solve(matrix, b.T).T) <= 1e-12
    plan = plan_routes(CurvatureSource.of(operator))
    assert [r.name for r in plan.routes if r.applicable] == ["direct", "cg"]


def test_auto_options_are_checked():
    with pytest.raises(tfi.errors.InputError, match="memory_bytes"):
        Auto(memory_bytes=0)
    with pytest.raises(tfi.errors.InputError, match="Unknown option"):
        tfi.solvers.make_solver("auto", maxiter=3)
