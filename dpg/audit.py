"""Which synthetic data shaped the model: tables over a run's records (pandas in, plain values out).

`records` is a rewards stage's `records.parquet` (one row per rollout: prompt, text, tau, advantage, ...), one
iteration's or several concatenated; `runs` its `sft_runs.parquet` (one row per SFT run: phi_before/phi_after).
tau_i = dPhi/dw_i, the exact metagradient of the target metric Phi (maximised) with respect to example i's
weight: a *proponent* (largest tau) pushed Phi up, an *opponent* (smallest tau) pushed it down.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

# The metric a person reads for each target, first match wins, with its better direction (True: higher).
# `text_share_<code>` is a language share; Phi (higher is better for every target) is the fallback.
HUMAN_METRICS = (("eval_pixel_accuracy", True), ("eval_l2_norm", False), ("text_share_contains", True),
                 ("text_edit_distance", False), ("text_share_", True), ("eval_val_loss", False))


def human_metric(metrics: dict) -> tuple[str, float, bool] | None:
    """(key without its eval_ prefix, value, higher_is_better) of the run's human metric in `metrics` (an
    iteration's eval and text metrics), else Phi's; None when neither is there."""
    for key, higher in HUMAN_METRICS:
        if key.endswith("_"):  # a prefix
            hits = [k for k in sorted(metrics) if k.startswith(key) and k != "text_share_contains"]
        else:
            hits = [key] if key in metrics else []
        if hits:
            return hits[0].removeprefix("eval_"), float(metrics[hits[0]]), higher
    return ("phi", float(metrics["eval_phi"]), True) if "eval_phi" in metrics else None


def excerpt(text: str, chars: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= chars else text[:chars - 1] + "…"


def example_row(row: pd.Series, chars: int = 160) -> dict:
    scale = float(row["tau_scale"])
    return {"example_id": row["example_id"], "iteration": int(row["outer_iteration"]),
            "prompt_id": int(row["prompt_id"]), "sft_group": int(row["group_id"]),
            "tau": float(row["tau"]), "tau_normalised": float(row["tau"]) / scale if scale > 0 else math.nan,
            "advantage": float(row["advantage"]), "generator_version": row["generator_version"],
            "prompt": excerpt(row["prompt"], chars), "text": excerpt(row["text"], chars)}


def top_examples(records: pd.DataFrame, k: int = 5, by: str = "tau", chars: int = 160) -> dict[str, list[dict]]:
    """The k proponents (largest `by`: tau or advantage) and the k opponents (smallest); rows without a reward
    (an empty completion's tau is NaN) are left out. Ties keep the records' order (example_id)."""
    scored = records[records[by].notna()].sort_values(["outer_iteration", "example_id"], kind="stable")
    order = scored[by].to_numpy()
    up = scored.iloc[np.argsort(-order, kind="stable")[:k]]
    down = scored.iloc[np.argsort(order, kind="stable")[:k]]
    return {"proponents": [example_row(r, chars) for _, r in up.iterrows()],
            "opponents": [example_row(r, chars) for _, r in down.iterrows()]}


def top_share(values, share: float) -> float:
    """The share of sum |v| held by the largest ceil(share * n) of |v| (nan when every v is 0)."""
    v = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
    total = v.sum()
    return float(v[:max(1, math.ceil(share * len(v)))].sum() / total) if len(v) and total > 0 else math.nan


def sft_agreement(records: pd.DataFrame, runs: pd.DataFrame) -> list[dict]:
    """Per SFT run: the measured Phi change of its fine-tune (phi_after - phi_before) next to sum_i tau_i over its
    examples (the first-order prediction of that change), and how concentrated |tau| is (top 1 % / 10 %)."""
    out = []
    for _, run in runs.sort_values(["outer_iteration", "group_id"]).iterrows():
        mine = records[(records["outer_iteration"] == run["outer_iteration"])
                       & (records["group_id"] == run["group_id"])]
        tau = mine["tau"].dropna().to_numpy(dtype=np.float64)
        change = float(run["phi_after"] - run["phi_before"])
        predicted = float(tau.sum())
        out.append({"iteration": int(run["outer_iteration"]), "sft_group": int(run["group_id"]),
                    "examples": int(run["n_examples"]), "phi_change": change, "sum_tau": predicted,
                    "ratio": predicted / change if change else math.nan,
                    "top_1pct_share": top_share(tau, 0.01), "top_10pct_share": top_share(tau, 0.10)})
    return out


def agreement(rows: list[dict]) -> dict:
    """Over SFT runs (sft_agreement rows): how often sum tau has the sign of the measured Phi change, their
    Pearson correlation, and the median of their ratio."""
    change = np.array([r["phi_change"] for r in rows], dtype=np.float64)
    predicted = np.array([r["sum_tau"] for r in rows], dtype=np.float64)
    ratio = predicted[change != 0] / change[change != 0]
    corr = float(np.corrcoef(change, predicted)[0, 1]) if len(rows) > 2 and change.std() and predicted.std() \
        else math.nan
    return {"sft_runs": len(rows), "same_sign_share": float(np.mean(np.sign(change) == np.sign(predicted)))
            if len(rows) else math.nan, "pearson": corr, "median_ratio": float(np.median(ratio)) if len(ratio)
            else math.nan}


def iteration_summary(records: pd.DataFrame, metrics: dict) -> dict:
    """One iteration at a glance: its human metric and Phi after SFT on all its data (the report's `eval_*`), the
    reward spread, and what the texts looked like (length in generator tokens, empty share, `text_*` metrics)."""
    tau = records["tau"].dropna()
    row = {"iteration": int(records["outer_iteration"].iloc[0]), "rollouts": len(records),
           "tau_std": float(tau.std(ddof=0)) if len(tau) else math.nan,
           "tau_abs_mean": float(tau.abs().mean()) if len(tau) else math.nan,
           "mean_tokens": float(records["token_ids"].map(len).mean()), "empty_share": float(records["empty"].mean()),
           "generator_version": str(records["generator_version"].iloc[0])}
    row.update({k: float(v) for k, v in sorted(metrics.items())
                if k.startswith(("eval_", "text_")) and k != "eval_examples"})
    return row


def spearman(a, b) -> float:
    a, b = pd.Series(np.asarray(a, dtype=np.float64)), pd.Series(np.asarray(b, dtype=np.float64))
    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return math.nan
    return float(np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1])


def counterfactuals(target_model, input_ids, attention_mask, target, config, tau, k: int, subsets: int,
                    rng: np.random.Generator) -> dict:
    """Retrain one SFT group with examples left out (weight 0; the inner steps stay the same) and compare the
    actual Phi change with the first-order prediction from tau (sum over the left-out examples of -tau_i):
    without the top-k proponents, without the top-k opponents, without k random examples, and over `subsets`
    random halves the linear datamodeling score (Spearman between predicted and actual Phi).

    `tau` (n,) float64 holds NaN for rows without a reward (empty completions); they are never left out.
    """
    import torch

    from dpg.sft import train

    def phi(weights: np.ndarray) -> float:
        trained = train(target_model, input_ids, attention_mask, config,
                        weights=torch.tensor(weights, dtype=torch.float32))
        with torch.no_grad():
            return float(target(trained))

    n = len(tau)
    scored = np.flatnonzero(~np.isnan(tau))
    t = np.nan_to_num(tau, nan=0.0)
    full = phi(np.ones(n))
    order = scored[np.argsort(-t[scored], kind="stable")]
    picks = {"proponents": order[:k], "opponents": order[::-1][:k],
             "random": rng.choice(scored, size=min(k, len(scored)), replace=False)}
    out = {"phi_full": full, "k": int(k)}
    for name, rows in picks.items():
        weights = np.ones(n)
        weights[rows] = 0.0
        out[name] = {"left_out": rows.tolist(), "actual": phi(weights) - full, "predicted": float(-t[rows].sum())}
    actual, predicted = [], []
    for _ in range(subsets):
        weights = np.ones(n)
        weights[rng.choice(scored, size=len(scored) // 2, replace=False)] = 0.0
        actual.append(phi(weights) - full)
        predicted.append(float(((weights - 1.0) * t).sum()))
    out["subsets"] = {"actual": actual, "predicted": predicted, "lds": spearman(predicted, actual)}
    return out
