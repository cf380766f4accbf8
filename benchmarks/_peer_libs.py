"""The PyTorch peers, configured to solve tf_influence's system: pyDVL 0.10 and kronfluence 1.0.

Each `*_run(...)` returns a zero-argument function that does the user's whole computation (object
construction, fitting, solving, scoring) and returns the score matrix [n_test, n_train] as numpy.
Construction of the returned function does no work, so timing it measures everything.

How each peer maps onto score[t, i] = g_tᵀ (H + λI)⁻¹ g_i (H: Hessian of the MEAN loss):

* pyDVL `DirectInfluence(model, F.cross_entropy, regularization=λ)`: H = `torch.func.hessian` of
  the batch-mean loss averaged over equal-sized batches (= the mean loss), `torch.linalg.solve`
  of (H + λI); `influences(x_test, y_test, x, y)` = factors @ gradsᵀ, no sign flip. Same system.
* pyDVL `CgInfluence(..., solve_simultaneously=True)` (block CG): stops when
  ‖r_j‖ ≤ max(rtol²·‖b_j‖, atol²) — the tolerances enter SQUARED — so a relative residual of
  1e-6 is `rtol=1e-3` (atol tiny). x₀ = b. Same system; `peers.py` checks the residual reached.
* pyDVL `LissaInfluence(regularization=λ, dampen=0, scale=s, maxiter=J)`: h ← b + h − (H̃ + λI)h/s,
  x = h/s, fixed point (H + λI)x = b; a fresh shuffled minibatch (the fit DataLoader's batch
  size) each step. `rtol=0` makes it run exactly J steps, like tf_influence's LiSSA.
* pyDVL `EkfacInfluence(update_diagonal=True, hessian_regularization=λ)`: λ added to the
  eigenvalue-corrected diagonal, factors normalised by n (mean). Its factors come from a
  deterministic rank-one pseudo-gradient per example (Σ_c √p_c ∇log p_c), not from sampled
  labels: it approximates a different curvature matrix than the sampled true Fisher of
  tf_influence and kronfluence. `update_diagonal=False` is its KFAC. Its factor buffers are
  created in torch's default dtype, so `peers.py` sets `torch.set_default_dtype(torch.float64)`.
* kronfluence `Analyzer.fit_all_factors` + `compute_pairwise_scores` with the task below
  (per-example losses SUMMED, so per-sample gradients are g_i and covariances are means),
  labels sampled from the model (true Fisher), `ScoreArguments(damping_factor=λ)`: λ added to
  the (E)KFAC eigenvalues as an absolute number (None would be the 0.1·mean heuristic).
  Score = measurement gradient · preconditioned train gradient, no sign flip. Every dtype is set
  to float64 (kronfluence defaults to float32 statistics and scores); kronfluence has no exact,
  CG or LiSSA solver. It writes factors and scores to a temporary directory, as it always does.
"""

import logging
import shutil
import tempfile
import warnings

import numpy as np


def available():
    """(True, versions) when torch, pyDVL and kronfluence import; else (False, the reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import kronfluence.version
            import pydvl
            import pydvl.influence.torch
            import torch
    except Exception as e:  # noqa: BLE001 - any import failure means: skip the peers
        return False, f"{type(e).__name__}: {e}"
    return True, f"torch {torch.__version__}, pyDVL {pydvl.__version__}, kronfluence {kronfluence.version.__version__}"


def setup(threads=None):
    """Process-wide settings for a like-for-like float64 comparison; quiets the peers' logging."""
    import torch

    torch.set_default_dtype(torch.float64)
    if threads:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("pydvl", "kronfluence", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _tensors(x, y):
    import torch

    return torch.from_numpy(np.asarray(x, np.float64)), torch.from_numpy(np.asarray(y, np.int64))


def _loader(x, y, batch_size, shuffle=False):
    import torch

    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_tensors(x, y)),
                                       batch_size=batch_size, shuffle=shuffle)


def pydvl_run(method, torch_model, train, test, damping, *, batch_size, cg_rtol=1e-3, lissa=None,
              score_chunk=None):
    """pyDVL: `method` in {"direct", "cg", "lissa", "ekfac", "kfac"}; returns run() -> scores.

    `lissa` = dict(scale, depth, batch_size); `score_chunk` splits the training side of the
    scoring (peak memory of per-sample gradients) for large models.
    """
    import torch
    import torch.nn.functional as F
    from pydvl.influence.torch import CgInfluence, DirectInfluence, EkfacInfluence, LissaInfluence

    x_test, y_test = _tensors(*test)
    x_train, y_train = _tensors(*train)
    damping = float(damping)
    n_params = sum(p.numel() for p in torch_model.parameters())

    def build():
        if method == "direct":
            return DirectInfluence(torch_model, F.cross_entropy, regularization=damping), batch_size
        if method == "cg":
            return CgInfluence(torch_model, F.cross_entropy, regularization=damping, rtol=cg_rtol, atol=1e-30,
                               maxiter=n_params, solve_simultaneously=True,
                               warn_on_max_iteration=True), batch_size
        if method == "lissa":
            return LissaInfluence(torch_model, F.cross_entropy, regularization=damping, maxiter=lissa["depth"],
                                  dampen=0.0, scale=float(lissa["scale"]), rtol=0.0,
                                  warn_on_max_iteration=False), lissa["batch_size"]
        if method in ("ekfac", "kfac"):
            return EkfacInfluence(torch_model, update_diagonal=method == "ekfac",
                                  hessian_regularization=damping), batch_size
        raise ValueError(f"pyDVL method must be direct, cg, lissa, ekfac or kfac. Received: {method!r}.")

    def run(fit_only=False, fitted=None):
        influence = fitted
        if influence is None:
            influence, fit_batch = build()
            influence = influence.fit(_loader(*train, fit_batch))
        if fit_only:
            return influence
        chunk = score_chunk or len(x_train)
        if chunk >= len(x_train):
            return influence.influences(x_test, y_test, x_train, y_train).detach().numpy()
        factors = influence.influence_factors(x_test, y_test)
        parts = [influence.influences_from_factors(factors, x_train[i:i + chunk], y_train[i:i + chunk])
                 for i in range(0, len(x_train), chunk)]
        return torch.cat(parts, dim=1).detach().numpy()

    run.fit = lambda: run(fit_only=True)
    run.score = lambda fitted: run(fitted=fitted)
    run.factors = lambda fitted: fitted.influence_factors(x_test, y_test).detach().numpy()
    return run


def _task():
    import torch
    import torch.nn.functional as F
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Per-example cross-entropies summed; sampled labels for the true Fisher."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def kronfluence_run(strategy, torch_model, train, test, damping, *, batch_size, query_batch_size=None,
                    float64=True, seed=0):
    """kronfluence: `strategy` "ekfac" or "kfac"; returns run() -> scores (fit + score).

    run.fit() -> fitted state, run.score(state) -> scores time the two stages apart.
    """
    import copy

    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    dtype = torch.float64 if float64 else torch.float32
    dtypes = {} if not float64 else dict(
        activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype,
        lambda_dtype=dtype)
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=False, covariance_max_examples=None,
                                  lambda_max_examples=None, **dtypes)
    score_dtypes = {} if not float64 else dict(per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                               score_dtype=dtype)
    score_args = ScoreArguments(damping_factor=float(damping), **score_dtypes)
    train_set = torch.utils.data.TensorDataset(*_tensors(*train))
    test_set = torch.utils.data.TensorDataset(*_tensors(*test))
    query_batch_size = query_batch_size or len(test_set)

    def fit():
        torch.manual_seed(seed)
        task = _task()
        model = prepare_model(copy.deepcopy(torch_model), task)
        directory = tempfile.mkdtemp(prefix="kronfluence_")
        analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True, disable_tqdm=True,
                            output_dir=directory, log_level=logging.ERROR)
        analyzer.fit_all_factors(factors_name=strategy, dataset=train_set, per_device_batch_size=batch_size,
                                 factor_args=factor_args, overwrite_output_dir=True)
        return analyzer, directory

    def score(state):
        analyzer, directory = state
        try:
            analyzer.compute_pairwise_scores(
                scores_name="scores", factors_name=strategy, query_dataset=test_set, train_dataset=train_set,
                per_device_query_batch_size=query_batch_size, per_device_train_batch_size=batch_size,
                score_args=score_args, overwrite_output_dir=True)
            scores = analyzer.load_pairwise_scores(scores_name="scores")["all_modules"]
            return scores.detach().to(torch.float64).numpy()
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def run():
        return score(fit())

    run.fit, run.score = fit, score
    return run
