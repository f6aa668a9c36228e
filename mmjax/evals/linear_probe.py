"""Linear probes on frozen features: big_vision's few-shot ridge regression and a full
multinomial logistic regression.

Both classifiers first whiten the features with the training set's statistics, as big_vision's
fewshot_lsr evaluator does: x' = (x - mean) / (std + 1e-5), per dimension, population std.
The returned (W, b) fold that back in, so they apply to the raw features:
scores = features @ W + b [N, C].

- "ridge" (big_vision/evaluators/fewshot_lsr.py): regularised least squares on one-hot
  targets rescaled to ±1. The bias is a constant feature of value 100 appended to x', so it
  is regularised like the weights but, at that scale, hardly at all. Closed form
  W' = (X'ᵀX' + λI)⁻¹ X'ᵀY, solved in the dual (X'ᵀ(X'X'ᵀ + λI)⁻¹Y) when there are fewer
  examples than dimensions. big_vision's default λ = 2¹⁰.
- "logistic": multinomial logistic regression (CLIP's linear probe, Radford et al. 2021
  §3.2, used scikit-learn's L-BFGS): mean cross-entropy + λ/2 ‖W'‖² (bias not
  regularised), minimised with scipy's L-BFGS-B from zero. λ here is on another scale than
  ridge's; sweep it on a validation split for a real benchmark, as CLIP did.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

METHODS = ("ridge", "logistic")
BIAS_CONSTANT = 100.0  # big_vision's constant bias feature
STD_EPS = 1e-5  # big_vision: std + 1e-5
DEFAULT_L2 = {"ridge": 2.0**10, "logistic": 1e-3}


def fewshot_indices(labels, shots: int, seed: int) -> np.ndarray:
    """Indices of `shots` examples of each class present in `labels` (all of a class's
    examples when it has fewer), in class order, as big_vision draws them: per class in
    ascending order, a permutation of its indices from np.random.default_rng(seed), first
    `shots` kept. The same seed gives nested sets: the 5-shot set contains the 1-shot set."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in np.unique(labels)]
    return np.concatenate(per_class).astype(np.int64) if per_class else np.zeros(0, np.int64)


def _whiten_stats(x: np.ndarray):
    return x.mean(axis=0), x.std(axis=0) + STD_EPS


def _unwhiten(w: np.ndarray, b: np.ndarray, mean: np.ndarray, std: np.ndarray):
    """(W, b) on raw features from W' [D, C], b [C] on whitened ones."""
    w_raw = w / std[:, None]
    return w_raw, b - mean @ w_raw


def _targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return np.eye(num_classes)[labels]


def ridge_classifier(train_features, train_labels, num_classes: int, l2_reg: float = DEFAULT_L2["ridge"]):
    """(W [D, C], b [C]) of big_vision's few-shot least-squares classifier (module docstring)."""
    x = np.asarray(train_features, np.float64)
    y = 2.0 * _targets(train_labels, num_classes) - 1.0
    mean, std = _whiten_stats(x)
    x = np.concatenate([(x - mean) / std, np.full((len(x), 1), BIAS_CONSTANT)], axis=1)
    n, d = x.shape
    if n >= d:
        w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
    else:
        w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
    return _unwhiten(w[:-1], BIAS_CONSTANT * w[-1], mean, std)


def logistic_classifier(
    train_features, train_labels, num_classes: int, l2_reg: float = DEFAULT_L2["logistic"], max_iter: int = 1000, tol: float = 1e-8
):
    """(W [D, C], b [C]) of multinomial logistic regression on whitened features, fitted with
    L-BFGS (module docstring). Deterministic: starts from zero."""
    x = np.asarray(train_features, np.float64)
    y = _targets(train_labels, num_classes)
    mean, std = _whiten_stats(x)
    x = (x - mean) / std
    n, d = x.shape

    def loss_and_grad(theta):
        w, b = theta[: d * num_classes].reshape(d, num_classes), theta[d * num_classes :]
        logits = x @ w + b
        log_p = log_softmax(logits, axis=1)
        loss = -np.sum(y * log_p) / n + 0.5 * l2_reg * np.sum(w * w)
        residual = (softmax(logits, axis=1) - y) / n
        grad_w = x.T @ residual + l2_reg * w
        return loss, np.concatenate([grad_w.ravel(), residual.sum(axis=0)])

    theta0 = np.zeros(d * num_classes + num_classes)
    result = minimize(
        loss_and_grad, theta0, jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-12}
    )
    w, b = result.x[: d * num_classes].reshape(d, num_classes), result.x[d * num_classes :]
    return _unwhiten(w, b, mean, std)


def predict(features, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Class scores [N, C] = features @ W + b."""
    return np.asarray(features, np.float64) @ w + b


def _top1(features, labels, w, b) -> float:
    return float(np.mean(np.argmax(predict(features, w, b), axis=1) == np.asarray(labels)))


def probe(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes: int,
    *,
    shots=(1, 5, 10, 25),
    l2_reg: float | None = None,
    method: str = "ridge",
    full: bool = True,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Test top-1 accuracy of a linear classifier fitted on `shots` examples per class
    (`{shots}shot_top1`, the training examples drawn by fewshot_indices(seed)) and, with
    `full`, on every training example (`full_top1`). l2_reg None: DEFAULT_L2[method]."""
    if method not in METHODS:
        raise ValueError(f"unknown probe method {method!r}; use one of {METHODS}")
    l2 = DEFAULT_L2[method] if l2_reg is None else l2_reg
    train_features, train_labels = np.asarray(train_features), np.asarray(train_labels)

    def fit(x, y):
        if method == "ridge":
            return ridge_classifier(x, y, num_classes, l2)
        return logistic_classifier(x, y, num_classes, l2, max_iter=max_iter)

    results = {}
    for n in shots:
        idx = fewshot_indices(train_labels, n, seed)
        results[f"{n}shot_top1"] = _top1(test_features, test_labels, *fit(train_features[idx], train_labels[idx]))
    if full:
        results["full_top1"] = _top1(test_features, test_labels, *fit(train_features, train_labels))
    return results
