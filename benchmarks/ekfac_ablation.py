"""Why does pyDVL's EKFAC score closer to the exact solve than tf_influence's on the identical model?

One float64 Keras MLP 64-32-10 (tanh, logits; the shared benchmark model of `peers.py`) on digits
(1,200 train / 50 test). Every EKFAC/KFAC variant is built here by brute force in NumPy from the
same per-example layer inputs `a` (1 appended for the bias) and pre-activation gradients `g = J_zᵀ u`
for an output-space target `u`, so the variants differ in exactly one ingredient:

  target (what stands for the output Hessian M = diag(p) − ppᵀ of softmax cross-entropy):
    sampled-1     one label ĉ ~ p per example, u = p − e_ĉ          (tf_influence's fisher="true")
    sampled-10    ten labels, weights 1/10
    exact         u_c = √p_c (e_c − p) for all C classes: Σ_c u_c u_cᵀ = M exactly (fisher="ggn")
    pydvl         ONE deterministic u = Σ_c √p_c (e_c − p) = ∇_f Σ_c √p_c log p_c (pyDVL's
                  `empirical_cross_entropy_loss_fn`): u uᵀ = M + cross terms; not M in expectation
    empirical     u = p − e_y at the true label

  eigenvalues: EKFAC (Λ* from the second pass) or KFAC (λ_A ⊗ λ_S).

Bias handling (a 1 appended to a), normalisation (means over n), and damping (λ added to every
eigenvalue) are the same in both libraries; the script checks the "pydvl" variant against pyDVL's
own `EkfacInfluence` when torch and pyDVL import (run with /work/venv-peers/bin/python).

Also shown, to separate the approximation steps: the block-diagonal (per-layer) exact Gauss-Newton
and Hessian, and the full exact Gauss-Newton. Pearson of the [50, 1200] score matrices against the
exact damped Hessian solve (and against the exact damped Gauss-Newton solve).

Run: /work/venv-peers/bin/python benchmarks/ekfac_ablation.py [--lambdas 0.01 0.1]
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _peer_models as pm  # noqa: E402

import tf_influence as tfi  # noqa: E402


def layer_quantities(model, x):
    """Per example: a1 [n, 65], a2 [n, 33], the softmax p [n, 10] and the hidden derivative [n, 32]."""
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in model.get_weights())
    z1 = x @ w1 + b1
    h = np.tanh(z1)
    logits = h @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ones = np.ones((len(x), 1))
    return dict(a=[np.hstack([x, ones]), np.hstack([h, ones])], p=p, dh=1.0 - h ** 2, w2=w2)


def preactivation_gradients(q, u):
    """g per layer for output vectors u [n, 10]: g2 = u, g1 = (u W2ᵀ) ⊙ tanh'."""
    return [(u @ q["w2"].T) * q["dh"], u]


def targets(q, y, kind, rng):
    """List of (u [n, 10], weight c [n])."""
    p, n = q["p"], len(q["p"])
    eye = np.eye(p.shape[1])
    if kind.startswith("sampled"):
        k = int(kind.split("-")[1])
        out = []
        for _ in range(k):
            labels = np.array([rng.choice(p.shape[1], p=row / row.sum()) for row in p])
            out.append((p - eye[labels], np.full(n, 1.0 / k)))
        return out
    if kind == "exact":
        return [(np.sqrt(p[:, [c]]) * (eye[c] - p), np.ones(n)) for c in range(p.shape[1])]
    if kind == "pydvl":
        u = sum(np.sqrt(p[:, [c]]) * (eye[c] - p) for c in range(p.shape[1]))
        return [(u, np.ones(n))]
    if kind == "empirical":
        return [(p - eye[y], np.ones(n))]
    raise ValueError(kind)


def fit(q, target_list, method):
    """Per layer (Q_A, Q_S, Λ) with Λ the EKFAC or KFAC eigenvalues."""
    n = len(q["p"])
    layers = []
    for layer, a in enumerate(q["a"]):
        gs = [(preactivation_gradients(q, u)[layer], c) for u, c in target_list]
        A = a.T @ a / n
        S = sum((g * c[:, None]).T @ g for g, c in gs) / n
        eig_a, q_a = np.linalg.eigh(A)
        eig_s, q_s = np.linalg.eigh(S)
        if method == "kfac":
            lam = np.outer(np.maximum(eig_a, 0), np.maximum(eig_s, 0))
        else:
            a_hat = (a @ q_a) ** 2
            lam = sum(a_hat.T @ (c[:, None] * (g @ q_s) ** 2) for g, c in gs) / n
        layers.append((q_a, q_s, lam))
    return layers


def split(rows, shapes):
    """Flat Keras-order rows [k, p] -> per-layer matrices [k, d_a, d_g] (kernel rows, then bias)."""
    out, start = [], 0
    for d_a, d_g in shapes:
        size = d_a * d_g
        out.append(rows[:, start:start + size].reshape(-1, d_a, d_g))
        start += size
    return out


def join(mats):
    return np.hstack([m.reshape(len(m), -1) for m in mats])


def kron_solve(layers, rows, damping, shapes):
    mats = split(rows, shapes)
    out = []
    for (q_a, q_s, lam), m in zip(layers, mats):
        proj = np.einsum("ka,nkl,lb->nab", q_a, m, q_s) / (lam + damping)
        out.append(np.einsum("ka,nab,lb->nkl", q_a, proj, q_s))
    return join(out)


def dense_ggn(q):
    """Exact Gauss-Newton matrix [p, p] of the mean loss, Keras flat order."""
    n = len(q["p"])
    total = 0.0
    for u, c in targets(q, None, "exact", None):
        g1, g2 = preactivation_gradients(q, u)
        rows = np.hstack([np.einsum("nk,nl->nkl", q["a"][0], g1).reshape(n, -1),
                          np.einsum("nk,nl->nkl", q["a"][1], g2).reshape(n, -1)])
        total = total + (rows * c[:, None]).T @ rows
    return total / n


def block_diagonal(matrix, shapes):
    out = np.zeros_like(matrix)
    start = 0
    for d_a, d_g in shapes:
        s = slice(start, start + d_a * d_g)
        out[s, s] = matrix[s, s]
        start += d_a * d_g
    return out


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lambdas", nargs="+", type=float, default=[0.001, 0.01, 0.1])
    parser.add_argument("--seeds", type=int, default=3, help="label-sampling seeds for the sampled variants")
    args = parser.parse_args(argv)
    data = pm.digits(n_train=1200, n_test=50)
    train, test = (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
    model = pm.train_mlp((64, 32, 10), *train, epochs=100)
    shapes = [(65, 32), (33, 10)]
    hessian = pm.keras_hessian(model, *train)
    g_train, g_test = pm.keras_gradients(model, *train), pm.keras_gradients(model, *test)
    q = layer_quantities(model, train[0])
    ggn = dense_ggn(q)
    ev_h, ev_g = np.linalg.eigvalsh(hessian), np.linalg.eigvalsh(ggn)
    print(f"H eigenvalues [{ev_h[0]:.3g}, {ev_h[-1]:.3g}] ({int((ev_h < 0).sum())} negative); "
          f"GGN [{ev_g[0]:.3g}, {ev_g[-1]:.3g}]; ‖H − GGN‖/‖H‖ = "
          f"{np.linalg.norm(hessian - ggn) / np.linalg.norm(hessian):.3f}")

    pydvl_scores = _pydvl_scores(model, train, test, args.lambdas)
    results = []
    for damping in args.lambdas:
        eye = np.eye(len(hessian))
        truth = g_test @ np.linalg.solve(hessian + damping * eye, g_train.T)
        truth_ggn = g_test @ np.linalg.solve(ggn + damping * eye, g_train.T)

        def row(name, scores, note=""):
            results.append((damping, name, pearson(scores, truth), pearson(scores, truth_ggn), note))

        row("exact GGN (full)", truth_ggn)
        row("block-diag exact GGN", g_test @ np.linalg.solve(block_diagonal(ggn, shapes) + damping * eye, g_train.T))
        row("block-diag exact H", g_test @ np.linalg.solve(block_diagonal(hessian, shapes) + damping * eye, g_train.T))
        for kind in ("exact", "pydvl", "sampled-1", "sampled-10", "empirical"):
            for method in ("ekfac", "kfac"):
                seeds = range(args.seeds) if kind.startswith("sampled") else [0]
                values = []
                for seed in seeds:
                    layers = fit(q, targets(q, train[1], kind, np.random.default_rng(seed)), method)
                    solved = kron_solve(layers, g_test, damping, shapes)
                    values.append(solved @ g_train.T)
                ph = [pearson(s, truth) for s in values]
                pg = [pearson(s, truth_ggn) for s in values]
                note = f"±{np.std(ph):.3f} over {len(ph)} seeds" if len(ph) > 1 else ""
                results.append((damping, f"{method.upper()} {kind}", float(np.mean(ph)), float(np.mean(pg)), note))
        for fisher in ("true", "ggn"):
            for cls in (tfi.solvers.EKFAC, tfi.solvers.KFAC):
                inf = tfi.Influence(model, pm.loss_fn(), train, method=cls(seed=0, fisher=fisher), damping=damping,
                                    batch_size=len(train[0]), progress=False)
                row(f"tf_influence {cls.name.upper()} fisher={fisher}", inf.scores(test))
        if pydvl_scores is not None:
            for method, scores in pydvl_scores[damping].items():
                row(f"pyDVL {method.upper()} (its code)", scores)

    print(f"\n{'λ':>6}  {'variant':<28} {'Pearson vs H':>12} {'vs GGN':>8}  note")
    for damping, name, ph, pg, note in results:
        print(f"{damping:>6g}  {name:<28} {ph:>12.4f} {pg:>8.4f}  {note}")
    return results


def _pydvl_scores(model, train, test, lambdas):
    try:
        import _peer_libs as libs
        ok, why = libs.available()
        if not ok:
            print(f"pyDVL not importable ({why}); its own rows are skipped.")
            return None
        libs.setup()
        twin = pm.torch_mlp_from_keras(model)
        pm.check_logits(model, twin, train[0])
        perm = pm.keras_to_torch_permutation(model)
        del perm  # scores are permutation invariant
        out = {}
        for damping in lambdas:
            out[damping] = {m: libs.pydvl_run(m, twin, train, test, damping, batch_size=len(train[0]))()
                            for m in ("ekfac", "kfac")}
        return out
    except Exception as e:  # noqa: BLE001 - the comparison rows are optional
        print(f"pyDVL rows skipped: {type(e).__name__}: {e}")
        return None


if __name__ == "__main__":
    main()
