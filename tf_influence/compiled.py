"""Compiled functions shared by every object built for the same model, loss, variables and options.

Tracing a curvature product or a per-example gradient of a model costs seconds (the pfor-vectorised
forward-over-back product of a small MLP: ~10 s), often more than the computation it compiles. The
library's objects (`HessianOperator`, `BatchFunctions`, the dense builder) are cheap to rebuild, and
users rebuild them: a second `Influence` with another damping, another test set, or after retraining.
`shared_function` lets all of them use one `tf.function`, traced once per input signature.

What makes two objects share a function (the key):
  identity  objects whose *identity* the graph depends on: the model, the selected variables, a loss
            object that cannot be compared by value, a distribution strategy. They are held by weak
            reference (the cache never keeps a model alive), compared by `is`, and the entry is
            dropped when one of them is garbage-collected (so a reused `id()` never hits).
  options   hashable values the graph depends on: a loss described by value (a name, or a Keras
            loss's class and config: a fresh `SparseCategoricalCrossentropy(from_logits=True)`
            hits), flags (training, curvature, mode, jit_compile), dtypes, the input signature.
Variables are read when the function runs, never baked in as constants, so new weights (retraining,
`assign`) are used by the same function without retracing.

The traced Python function receives the object that made the call (the "owner") as its first
argument. Every owner sharing a key is interchangeable by construction, so whichever one calls when
a new signature must be traced serves for the trace; the function must depend on the owner only
through what the key identifies.
"""

import threading
import weakref

import tensorflow as tf

_ENTRIES = {}
_LOCK = threading.RLock()  # re-entrant: a weak reference's callback may run inside, from gc
_TRACES = {"count": 0}


def shared_function(python_function, owner, *, identity=(), options=(), **tf_function_options):
    """A `tf.function` of `python_function(owner, *args)`, shared by every owner with the same key.

    Args:
      python_function: `fn(owner, *args)`, a module-level function (it is part of the key by its
        qualified name; a closure or bound method would give every object its own entry). It must
        depend on `owner` only through what `identity` and `options` identify.
      owner: the object making calls through the returned function (weakly referenced).
      identity: objects the traced graph depends on by identity (model, variables, ...), held weakly.
      options: hashable values the traced graph depends on.
      **tf_function_options: options of `tf.function` (`input_signature`, `jit_compile`,
        `autograph`, `reduce_retracing`); part of the key.

    Returns:
      `call(*args)`: runs the shared `tf.function` on `args` with `owner` as the traced owner;
      `call.concrete_function(*specs)` returns its concrete function for `specs` (e.g. to inspect
      the graph), tracing only a signature not seen before.

    Example:
      >>> def batch_loss(problem, x, y, w):
      ...     return problem.objective.weighted_loss_sum(x, y, w)
      >>> fn = shared_function(batch_loss, problem, identity=[problem.model], options=("sum",))
      >>> fn(x, y, w)      # a second Problem of the same model calls the same trace
    """
    identity = list(identity)
    key = ((python_function.__module__, python_function.__qualname__), tuple(id(o) for o in identity),
           tuple(options), repr(sorted(tf_function_options.items())))
    with _LOCK:
        entry = _ENTRIES.get(key)
        if entry is None or not all(ref() is obj for ref, obj in zip(entry.refs, identity)):
            entry = _Entry(python_function, identity, key, tf_function_options)
            _ENTRIES[key] = entry
    owner_ref = weakref.ref(owner)

    def call(*args):
        entry.owner = owner_ref
        return entry.function(*args)

    def concrete_function(*specs):
        entry.owner = owner_ref
        return entry.function.get_concrete_function(*specs)

    call.concrete_function = concrete_function  # traced once per signature, like a call
    return call


def trace_count():
    """How many traces all shared functions made so far (for tests and profiling)."""
    return _TRACES["count"]


class _Entry:
    """One shared `tf.function`, the weak references that keep its key valid, and the latest owner."""

    def __init__(self, python_function, identity, key, tf_function_options):
        self.refs = [_weak(obj, lambda _, key=key: _drop(key, self)) for obj in identity]
        self.owner = None

        def traced(*args):
            _TRACES["count"] += 1  # Python side effect: runs once per trace
            return python_function(self.owner(), *args)

        self.function = tf.function(traced, **tf_function_options)


def _drop(key, entry):
    with _LOCK:
        if _ENTRIES.get(key) is entry:
            del _ENTRIES[key]


def _weak(obj, callback):
    try:
        return weakref.ref(obj, callback)
    except TypeError:  # not weak-referenceable (a builtin function): held, so its id is never reused
        return lambda: obj
