"""The Influence's `progress` setting reaches the method's own progress bar unless the method's was set."""

import keras

import tf_influence as tfi
from tests import models

sce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_lissa_progress_follows_the_influence_unless_set(float64, rng, capsys):
    x, y = models.classification_data(rng, n=16)
    model = models.mlp()

    def influence(shown_by_influence, **lissa_options):
        method = tfi.solvers.LiSSA(recursion_depth=4, batch_size=None, scale=10.0, **lissa_options)
        return tfi.Influence(model, sce, (x, y), method=method, damping=0.5, progress=shown_by_influence)

    assert influence(True).solver.progress is True and influence(True, progress=False).solver.progress is False
    for inf, shown in ((influence(False), False), (influence(False, progress=True), True)):
        assert inf.solver.progress is shown
        capsys.readouterr()
        inf.inverse_hvp(inf.training_gradients([0]))
        assert ("4/4" in capsys.readouterr().out) is shown
