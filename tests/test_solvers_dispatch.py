"""`inverse_hvp`, `make_solver` and the method objects: forms in = forms out, every method agrees."""

import dataclasses
import types

import numpy as np
import pytest
import tensorflow as tf

import tf_influence as tfi
from tests import helpers as sh
from tests.helpers import relative_error
from tf_influence.solvers import CG, SOLVERS, Direct, LiSSA, ScipyNCG, inverse_hvp, make_solver


@pytest.fixture
def prob(softmax_regression):
    return softmax_regression


METHODS = {
    "direct": ({}, 1e-10),
    "cg": (dict(tol=1e-10), 1e-6),
    "scipy": ({}, 1e-5),
    "lissa": (dict(scale=1.2, batch_size=sh.N, recursion_depth=1500, progress=False), 1e-3),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_by_name_agrees_with_the_dense_solve(prob, method):
    options, tolerance = METHODS[method]
    x, info = inverse_hvp(prob.operator, prob.b[0], method=method, **options)
    assert x.shape == (prob.operator.space.size,)
    assert relative_error(x, prob.solve(prob.b[0])) <= tolerance
    assert info.method == SOLVERS[method].name


def test_forms_in_equal_forms_out(prob):
    op, space = prob.operator, prob.operator.space
    reference = prob.solve(prob.b)
    rows, _ = inverse_hvp(op, prob.b, method="direct")  # [k, p] -> [k, p]
    assert rows.shape == prob.b.shape and relative_error(rows, reference) <= 1e-10
    shaped = space.unflatten(tf.constant(prob.b[0]))  # list shaped like the variables
    parts, _ = inverse_hvp(op, shaped, method="direct")
    assert [tuple(p.shape) for p in parts] == [(sh.D, sh.CLASSES), (sh.CLASSES,)]
    np.testing.assert_allclose(space.flatten(parts), reference[0], rtol=1e-10)
    batched = space.unflatten(tf.constant(prob.b))  # list with a leading axis of k vectors
    parts, _ = inverse_hvp(op, batched, method="direct")
    assert [tuple(p.shape) for p in parts] == [(3, sh.D, sh.CLASSES), (3, sh.CLASSES)]
    np.testing.assert_allclose(space.flatten(parts, batch_dims=1), reference, rtol=1e-10)


def test_accepts_an_object_holding_an_operator(prob):
    holder = types.SimpleNamespace(operator=prob.operator)
    x, info = inverse_hvp(holder, prob.b, method=Direct())
    assert relative_error(x, prob.solve(prob.b)) <= 1e-10 and info.method == "direct"
    with pytest.raises(tfi.InputError, match=r"LinearOperator.*\.operator attribute.*Received str"):
        inverse_hvp("H", prob.b)


def test_make_solver_names_classes_objects_and_overrides():
    assert make_solver("cg") == CG()
    assert make_solver("CG", tol=1e-8) == CG(tol=1e-8)
    assert make_solver(LiSSA, scale=3.0).scale == 3.0
    solver = CG(tol=1e-4, maxiter=7)
    assert make_solver(solver) is solver
    assert make_solver(solver, tol=1e-9) == CG(tol=1e-9, maxiter=7)
    assert make_solver("scipy_ncg") == make_solver("scipy") == ScipyNCG()
    assert {"direct", "cg", "lissa", "scipy"} <= set(SOLVERS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        solver.tol = 1.0


def test_make_solver_rejects_bad_input():
    with pytest.raises(tfi.InputError, match=r"Unknown method 'newton'. Known methods: \[.*'cg'.*'direct'.*'lissa'"):
        make_solver("newton")
    with pytest.raises(tfi.InputError, match=r"Unknown option\(s\) \['tolerance'\] for method 'cg'. Its options: \['tol'"):
        make_solver("cg", tolerance=1e-3)
    with pytest.raises(tfi.InputError, match=r"CG: tol must be a positive number. Received: tol=-1"):
        make_solver("cg", tol=-1)
    with pytest.raises(tfi.InputError, match=r"LiSSA: recursion_depth must be a positive integer. Received: recursion_depth=2.5"):
        LiSSA(recursion_depth=2.5)
    with pytest.raises(tfi.InputError, match=r"LiSSA: sampling must be one of .*Received: sampling='random'"):
        LiSSA(sampling="random")
    with pytest.raises(tfi.InputError, match=r"Direct: on_indefinite must be one of"):
        Direct(on_indefinite="maybe")
    with pytest.raises(tfi.InputError, match=r"method must be a method name .* Received int"):
        make_solver(3)


def test_inverse_hvp_rejects_bad_vectors(prob):
    with pytest.raises(tfi.InputError, match=r"flat \[p\] or \[k, p\].*\(2, 3, 21\)"):
        inverse_hvp(prob.operator, np.zeros((2, 3, 21)))
    with pytest.raises(tfi.InputError, match=r"list of 2 tensors shaped like the variables"):
        inverse_hvp(prob.operator, [np.zeros((sh.D, sh.CLASSES))])
    dense = sh.dense_operator(prob.dense, is_self_adjoint=True)
    with pytest.raises(tfi.InputError, match=r"need an operator with a parameter space"):
        inverse_hvp(dense, [np.zeros(21)])
    x, _ = inverse_hvp(dense, prob.b, method="cg", tol=1e-10)  # flat vectors work on any operator
    assert relative_error(x, prob.solve(prob.b)) <= 1e-8
