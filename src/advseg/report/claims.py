"""The paper's claims, re-tested from records: one function per claim, numbers and words.

1. **Attack-loss ranking** ("BCE attacks best, better than the training loss"): for each model,
   attack (``fgsm`` is the paper's equation 5, ``fgsm:notebook`` its notebook code, see
   :mod:`advseg.evaluate.compat`) and eps, the per-slice DSC under every loss, compared pair by
   pair with the paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) over slices,
   Holm-corrected within the row, with the direction of the effect (which loss leaves the lower
   DSC, on how many slices) and, as a check on the slices' dependence within a patient, the same
   test on per-case means. :func:`ranking_verdict` says in words which loss is strongest each way.
2. **Parameters against Attack Success** ("negligible correlation"): one point per model (the
   mean over training seeds), Spearman's rho with its *exact* permutation p-value (every pairing
   of n models; a handful of models cannot reach small p-values, and the text says how small p
   could be), and the spread of each model's Attack Success over seeds.
3. **Luminosity against Attack Success** (the paper's future work): per slice, a least-squares
   line with a 95% confidence band from a bootstrap over cases (slices of one patient move
   together), and Spearman's rho.

Per-slice DSC follows the run's protocol: ``paper`` is the notebook's per-slice Dice (mean over
the channels with MONAI's smoothing, slices with any mask); the other protocols use the mean Dice
over the classes present in the slice.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from advseg.metrics import PAPER_SMOOTH, attack_success, dice_from_counts
from advseg.report.html import Block, Section
from advseg.report.stats import RESAMPLES, SEED, smallest_p, spearman_test
from advseg.stats.bootstrap import MIN_CASES, case_weights

ALPHA = 0.05
ROW_KEYS = ["model", "attack", "eps"]


def _seeded(records: pd.DataFrame) -> list[str]:
    return ["seed"] if "seed" in records.columns else []


def per_slice_dsc(records: pd.DataFrame, protocol: str = "paper") -> pd.DataFrame:
    """One row per (model, [seed], attack, loss, eps, slice) with a mask: ``case``,
    ``luminosity``, ``dsc_clean``, ``dsc_adv``, ``attack_success`` (NaN where clean DSC is 0)."""
    keys = ["model", *_seeded(records), "attack", "loss", "eps", "slice_id"]
    frame = records.assign(_present=records["gt_pixels"] > 0)
    for which in ("clean", "adv"):
        counts = (frame[f"{c}_{which}"].to_numpy() for c in ("tp", "fp", "fn"))
        if protocol == "paper":
            values = dice_from_counts(*counts, smooth=PAPER_SMOOTH)
        else:
            values = np.where(frame["_present"], frame[f"dice_{which}"], np.nan)
        frame[f"_d_{which}"] = values
    out = (
        frame.groupby(keys, sort=True)
        .agg(
            case=("case", "first"),
            luminosity=("luminosity", "first"),
            present=("_present", "any"),
            dsc_clean=("_d_clean", "mean"),
            dsc_adv=("_d_adv", "mean"),
        )
        .reset_index()
    )
    out = out[out["present"]].drop(columns="present").reset_index(drop=True)
    out["attack_success"] = attack_success(out["dsc_clean"], out["dsc_adv"])
    return out


def _p(p: float) -> str:
    return "n/a" if not math.isfinite(p) else (f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}")


def _wilcoxon(d: np.ndarray) -> float:
    """Two-sided paired Wilcoxon signed-rank p of differences ``d``; 1 when all are zero.

    Zeros are dropped (``wilcox``). scipy's p is exact up to 50 differences without ties (and up
    to 13 with ties); for 14 to 50 differences with ties it would be asymptotic, so there the p
    comes from ``RESAMPLES`` seeded sign flips instead. Above 50: the normal approximation.
    """
    d = d[np.isfinite(d)]
    d = d[d != 0]
    if d.size == 0:
        return 1.0
    tied = len(np.unique(np.abs(d))) < d.size
    method = "auto"
    if tied and 13 < d.size <= 50:
        method = stats.PermutationMethod(n_resamples=RESAMPLES, rng=np.random.default_rng(SEED))
    return float(stats.wilcoxon(d, zero_method="wilcox", method=method).pvalue)


def _holm(pvalues: list[float]) -> list[float]:
    order = np.argsort(pvalues)
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def loss_ranking(slices: pd.DataFrame) -> pd.DataFrame:
    """Pairwise loss comparisons per (model, attack, eps) on paired per-slice DSC.

    Args:
        slices: :func:`per_slice_dsc`'s rows.

    Returns:
        One row per (model, attack, eps, loss_a, loss_b): ``n`` slice pairs (pooled over seeds),
        mean DSC under each loss, ``a_lower`` (share of pairs where ``loss_a`` leaves the lower
        DSC, ties excluded), ``p`` (Wilcoxon over slices), ``p_holm`` (Holm within the row),
        ``cases`` and ``p_cases`` (Wilcoxon over per-case means) with ``p_cases_holm``,
        ``diff`` (mean DSC under ``loss_a`` minus under ``loss_b``) with ``diff_low`` /
        ``diff_high`` (its 95% interval from a seeded bootstrap over cases: the effect's size,
        which a p-value over hundreds of slices does not give), ``seeds_a_lower`` ("k/n" seeds
        whose mean DSC is lower under ``loss_a``).
    """
    pair_keys = [*_seeded(slices), "slice_id"]
    rows = []
    for (model, attack, eps), group in slices.groupby(ROW_KEYS, sort=True):
        wide = group.pivot_table(index=pair_keys, columns="loss", values="dsc_adv")
        case = group.groupby(pair_keys)["case"].first().reindex(wide.index)
        losses = [loss for loss in group["loss"].drop_duplicates() if loss in wide.columns]
        found = []
        for a, b in combinations(losses, 2):
            both = wide[[a, b]].dropna()
            d = (both[a] - both[b]).to_numpy()
            owner = case.loc[both.index].to_numpy()
            per_case = (both[a] - both[b]).groupby(owner).mean()
            low, high = _case_interval(d, owner)
            seeds = ""
            if "seed" in pair_keys:
                by_seed = (both[a] - both[b]).groupby(level="seed").mean()
                seeds = f"{int((by_seed < 0).sum())}/{len(by_seed)}"
            decided = d[d != 0]
            found.append(
                {"model": model, "attack": attack, "eps": eps, "loss_a": a, "loss_b": b,
                 "n": len(d), "dsc_a": float(both[a].mean()), "dsc_b": float(both[b].mean()),
                 "a_lower": float((decided < 0).mean()) if decided.size else float("nan"),
                 "p": _wilcoxon(d), "cases": len(per_case),
                 "p_cases": _wilcoxon(per_case.to_numpy()), "diff": float(d.mean()),
                 "diff_low": low, "diff_high": high, "seeds_a_lower": seeds}
            )  # fmt: skip
        for level in ("p", "p_cases"):
            for row, adjusted in zip(found, _holm([r[level] for r in found]), strict=True):
                row[f"{level}_holm"] = adjusted
        rows += found
    return pd.DataFrame(rows)


def _case_interval(d: np.ndarray, owner: np.ndarray, draws: int = 2000) -> tuple[float, float]:
    """95% percentile interval of the mean of paired differences ``d`` (one per slice pair),
    resampling the cases that own them (``owner``): each draw weights a case's sum and count.
    NaN below :data:`~advseg.stats.bootstrap.MIN_CASES` cases, as every interval of the report
    (a bootstrap over one or a few patients is not meaningful)."""
    cases, index = np.unique(owner, return_inverse=True)
    if d.size == 0 or len(cases) < MIN_CASES:
        return float("nan"), float("nan")
    sums = np.bincount(index, weights=d, minlength=len(cases))
    counts = np.bincount(index, minlength=len(cases)).astype(float)
    weights = case_weights(len(cases), draws, SEED)
    means = (weights @ sums) / (weights @ counts)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def strongest(pairs: pd.DataFrame, level: str = "p_holm") -> tuple[str, str | None]:
    """The loss with the lowest mean DSC in one row of :func:`loss_ranking`, and whether it is
    *robustly* strongest: lower than every other loss with Holm-corrected p < 0.05, by slices
    (``level="p_holm"``) or by per-case means (``"p_cases_holm"``: cases as the units, the
    conservative reading when slices of one patient move together).

    Returns:
        ``(lowest-mean loss, that loss if robust else None)``.
    """
    means: dict[str, list[float]] = {}
    for r in pairs.itertuples():
        means.setdefault(r.loss_a, []).append(r.dsc_a)
        means.setdefault(r.loss_b, []).append(r.dsc_b)
    best = min(means, key=lambda k: np.mean(means[k]))
    for r in pairs.itertuples():
        if best not in (r.loss_a, r.loss_b):
            continue
        best_lower = r.dsc_a < r.dsc_b if r.loss_a == best else r.dsc_b < r.dsc_a
        if not best_lower or getattr(r, level) >= ALPHA:
            return best, None
    return best, best


def ranking_verdict(ranking: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per (model, attack, eps): the lowest-DSC loss, whether it is robustly strongest, and
    whether the paper's claim (BCE strongest) holds; plus sentences saying it per attack.

    ``robustly_strongest`` tests slices (many pairs, small p even for tiny effects; slices of a
    patient are not independent), ``robust_by_cases`` per-case means (few units, conservative).
    """
    rows = []
    for (model, attack, eps), pairs in ranking.groupby(ROW_KEYS, sort=True):
        lowest, robust = strongest(pairs)
        by_cases = strongest(pairs, "p_cases_holm")[1]
        rows.append({"model": model, "attack": attack, "eps": eps, "lowest_dsc": lowest,
                     "robustly_strongest": robust or "none",
                     "robust_by_cases": by_cases or "none",
                     "bce_strongest": robust == "bce",
                     "bce_strongest_by_cases": by_cases == "bce"})  # fmt: skip
    table = pd.DataFrame(rows)
    lines = []
    for attack, part in table.groupby("attack", sort=True):
        mode = "the paper's notebook code" if attack.endswith(":notebook") else "as named"
        lowest = part["lowest_dsc"].value_counts()
        lines.append(
            f"{attack} ({mode}): robustly strongest loss (lower DSC than every other loss, "
            f"Holm-corrected Wilcoxon p < {ALPHA}) over slices: "
            f"{_named(part['robustly_strongest'])} of {len(part)} (model, eps) rows, BCE in "
            f"{int(part['bce_strongest'].sum())}; over per-case means: "
            f"{_named(part['robust_by_cases'])}, BCE in "
            f"{int(part['bce_strongest_by_cases'].sum())}. "
            f"Lowest mean DSC: {', '.join(f'{loss} {n}x' for loss, n in lowest.items())}."
        )
    return table, lines


def _named(robust: pd.Series) -> str:
    counts = robust[robust != "none"].value_counts()
    return ", ".join(f"{loss} in {n}" for loss, n in counts.items()) or "no loss in any"


def exact_spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Spearman's rho with its two-sided p over pairings (:func:`advseg.report.stats.spearman_test`:
    every pairing for n <= 8, seeded resampled pairings up to 100 points).

    Returns:
        ``(rho, p, smallest attainable p)``; NaNs below three points or for a constant variable.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan"), float("nan")
    rho, p, _ = spearman_test(x, y)
    return rho, p, smallest_p(n)


def parameters_claim(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parameters against Attack Success, one point per model.

    Args:
        cells: one row per (model, [seed], params, attack, loss, eps) with ``as``.

    Returns:
        ``(spread, tests)``: per model and series the mean, standard deviation, minimum and
        maximum of Attack Success over seeds; per series (attack, loss, eps) the exact Spearman
        test over models (rho, p, the smallest p n models can give) and, with seeds, the range
        of the per-seed rho.
    """
    series = ["attack", "loss", "eps"]
    spread = (
        cells.groupby([*series, "model", "params"], sort=True)["as"]
        .agg(as_mean="mean", as_sd="std", as_min="min", as_max="max", seeds="count")
        .reset_index()
    )
    rows = []
    for key, part in spread.groupby(series, sort=True):
        rho, p, floor = exact_spearman(part["params"], part["as_mean"])
        row = dict(zip(series, key, strict=True))
        row.update(models=len(part), spearman_rho=rho, exact_p=p, smallest_p=floor)
        if "seed" in cells.columns:
            per_seed = [
                exact_spearman(s["params"], s["as"])[0]
                for _, s in cells[(cells[series] == pd.Series(key, series)).all(axis=1)].groupby(
                    "seed"
                )
            ]
            finite = [r for r in per_seed if math.isfinite(r)]  # none: too few models per seed
            low, high = (min(finite), max(finite)) if finite else (math.nan, math.nan)
            row.update(rho_seed_min=low, rho_seed_max=high)
        rows.append(row)
    return spread, pd.DataFrame(rows)


def parameters_words(tests: pd.DataFrame) -> str:
    """The parameter claim in one sentence per series (what rho and the exact p allow)."""
    parts = []
    for r in tests.itertuples():
        if not math.isfinite(r.spearman_rho):
            parts.append(f"{r.attack}/{r.loss} eps {r.eps:g}: untestable ({r.models} models)")
            continue
        verdict = "significant" if r.exact_p < ALPHA else "not significant"
        cannot = " (n too small to ever reach p < 0.05)" if r.smallest_p >= ALPHA else ""
        parts.append(
            f"{r.attack}/{r.loss} eps {r.eps:g}: rho {r.spearman_rho:.2f}, exact p "
            f"{_p(r.exact_p)} over {r.models} models, {verdict}{cannot}"
        )
    return "; ".join(parts) + "."


def luminosity_band(
    slices: pd.DataFrame, draws: int = 1000, seed: int = 0, points: int = 50
) -> dict[str, np.ndarray | float]:
    """A least-squares line of Attack Success on luminosity with a 95% case-bootstrap band.

    Returns:
        ``grid`` (luminosity values), ``fit``, ``low``, ``high`` (the band), ``slope`` with
        ``slope_low`` / ``slope_high``, Spearman ``rho`` and ``p`` (slices as independent; exact
        or permutation up to 100 slices, ``p_method`` says which), ``n``.
    """
    data = slices[np.isfinite(slices["attack_success"])]
    x, y = data["luminosity"].to_numpy(float), data["attack_success"].to_numpy(float)
    grid = np.linspace(x.min(), x.max(), points) if len(x) else np.zeros(0)
    nan = float("nan")
    out: dict = {"grid": grid, "n": len(x), "rho": nan, "p": nan, "slope": nan}
    if len(x) < 3 or np.all(x == x[0]):
        return out
    slope, intercept = np.polyfit(x, y, 1)
    if not np.all(y == y[0]):
        out["rho"], out["p"], out["p_method"] = spearman_test(x, y)
    cases, owner = np.unique(data["case"].to_numpy(), return_inverse=True)
    weights = case_weights(len(cases), draws, seed)[:, owner].astype(float)  # (D, N) per slice
    sw = weights.sum(1)
    mx, my = weights @ x / sw, weights @ y / sw
    sxx = weights @ (x**2) / sw - mx**2
    sxy = weights @ (x * y) / sw - mx * my
    with np.errstate(invalid="ignore", divide="ignore"):
        slopes = np.where(sxx > 0, sxy / sxx, np.nan)
    lines = (my - slopes * mx)[:, None] + slopes[:, None] * grid[None, :]  # (D, G)
    low, high = np.nanpercentile(lines, [2.5, 97.5], axis=0)
    slope_low, slope_high = np.nanpercentile(slopes, [2.5, 97.5])
    out.update(fit=intercept + slope * grid, low=low, high=high, slope=float(slope),
               slope_low=float(slope_low), slope_high=float(slope_high))  # fmt: skip
    return out


def luminosity_figure(slices: pd.DataFrame, title: str) -> Figure:
    """Per-slice Attack Success against luminosity, one panel per model (a grid of at most
    three columns), with the band; one legend below the panels."""
    from advseg.report.figures import panel_grid

    models = list(slices["model"].drop_duplicates())
    figure, axes = panel_grid(len(models), width=4.4, height=3.5)
    for ax, model in zip(axes, models, strict=True):
        part = slices[slices["model"] == model]
        ax.scatter(part["luminosity"], part["attack_success"], s=8, alpha=0.5, label="slices")
        band = luminosity_band(part)
        if "fit" in band:
            ax.plot(band["grid"], band["fit"], color="black", label="least squares")
            ax.fill_between(band["grid"], band["low"], band["high"], color="grey", alpha=0.35,
                            label="95% band (cases resampled)")  # fmt: skip
        heading = f"{model}: rho {band['rho']:.2f} (p {_p(band['p'])}), n {band['n']}"
        ax.set_title(heading, fontsize=9)
        ax.set_xlabel("slice luminosity (mean intensity, [0, 1])")
        ax.set_ylabel("Attack Success of the slice")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # a panel without a band adds nothing new; one with it, the band
        more = ax.get_legend_handles_labels()
        for handle, label in zip(*more, strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    figure.legend(handles, labels, loc="outside lower center", ncol=3, fontsize="small")
    figure.suptitle(title, fontsize=10)
    return figure


def luminosity_table(slices: pd.DataFrame) -> pd.DataFrame:
    """Per (model, attack, loss, eps): slope with its case-bootstrap interval, rho, p, n."""
    rows = []
    for key, part in slices.groupby(["model", "attack", "loss", "eps"], sort=True):
        band = luminosity_band(part)
        rows.append({**dict(zip(["model", "attack", "loss", "eps"], key, strict=True)),
                     "n": band["n"], "slope": band["slope"],
                     "slope_low": band.get("slope_low", float("nan")),
                     "slope_high": band.get("slope_high", float("nan")),
                     "spearman_rho": band["rho"], "p": band["p"],
                     "p_method": band.get("p_method", "n/a")})  # fmt: skip
    return pd.DataFrame(rows)


def claim_sections(
    writer,
    records: pd.DataFrame,
    protocol: str,
    eps: float,
    *,
    params: bool = True,
    luminosity: bool = True,
) -> list[Section]:
    """The report's claim sections (``writer`` is the report's file writer): the loss ranking
    always; the parameter claim with ``params`` and the luminosity claim with ``luminosity``
    (the report leaves out what cannot apply to its run: :func:`advseg.report.applies`)."""
    slices = per_slice_dsc(records, protocol)
    sections = []
    ranking = loss_ranking(slices)
    section = Section("Claim: BCE is the strongest attack loss")
    if ranking.empty:
        section.blocks.append(writer.note("No (model, attack, eps) has two losses to compare."))
    else:
        verdict, lines = ranking_verdict(ranking)
        section.blocks.append(Block("text", " ".join(lines)))
        caption = (
            "Per (model, attack, eps): the loss with the lowest mean per-slice DSC, and the "
            "loss that is robustly strongest (lower DSC than each other loss, Holm-corrected "
            f"paired Wilcoxon p < {ALPHA}) over slices and over per-case means (cases as "
            "units: the conservative reading); 'fgsm:notebook' is the paper's code, 'fgsm' eq. 5."
        )
        section.blocks.append(writer.table("claim_loss_verdict", verdict, caption))
        caption = (
            "Paired per-slice comparisons: n slice pairs (pooled over seeds), mean DSC under "
            "each loss, a_lower = share of pairs where loss_a leaves the lower DSC (ties left "
            "out), Wilcoxon signed-rank p over slices and Holm-corrected within the row, the "
            "same test over per-case means (p_cases, p_cases_holm), diff = mean DSC under "
            "loss_a minus loss_b with its 95% case-bootstrap interval (diff_low, diff_high; "
            f"2000 seeded draws; n/a below {MIN_CASES} cases: not meaningful), and the seeds "
            "where loss_a is lower."
        )
        section.blocks.append(writer.table("claim_loss_ranking", ranking, caption))
    sections.append(section)

    if params:
        sections.append(_params_claim(writer, records, protocol, eps))
    if luminosity:
        sections.append(_luminosity_claim(writer, slices, eps))
    return sections


def _params_claim(writer, records: pd.DataFrame, protocol: str, eps: float) -> Section:
    from advseg.stats.summary import summarize_cells

    keys = ["model", *_seeded(records), "arch", "params", "attack", "loss", "eps"]
    cells = []
    for key, group in records[records["eps"] == eps].groupby(keys, sort=False):
        row = summarize_cells(group.drop(columns=_seeded(records)), protocol).iloc[0]
        cells.append({**dict(zip(keys, key, strict=True)), "as": row["as"]})
    spread, tests = parameters_claim(pd.DataFrame(cells))
    return Section("Claim: parameter count has negligible correlation with AS", [
        Block("text", parameters_words(tests)),
        writer.table("claim_params_tests", tests, (
            f"eps {eps:g}: Spearman rho of parameters and Attack Success over models (mean over "
            "seeds), exact permutation p over every pairing (up to 8 models; seeded "
            "permutations beyond); smallest_p: the smallest p-value "
            "that many models can give; rho_seed_min/max: the range of rho seed by seed.")),
        writer.table("claim_params_spread", spread, (
            "Attack Success per model over training seeds: mean, standard deviation, range.")),
    ])  # fmt: skip


def _luminosity_claim(writer, slices: pd.DataFrame, eps: float) -> Section:
    section = Section("Claim (future work): luminosity against Attack Success")
    at_eps = slices[slices["eps"] == eps]
    for (attack, loss), part in at_eps.groupby(["attack", "loss"], sort=True):
        title = f"{attack} / {loss}, eps {eps:g}: one point per slice"
        name = f"claim_luminosity_{attack}_{loss}".replace(":", "-")
        section.blocks.append(writer.figure(name, luminosity_figure(part, title), title))
    caption = (
        "Least-squares slope of per-slice Attack Success on luminosity with its 95% interval "
        "from a bootstrap over cases, and Spearman's rho (p treats slices as independent; "
        "p_method: exact over every pairing, seeded permutations, or asymptotic above 100)."
    )
    section.blocks.append(writer.table("claim_luminosity", luminosity_table(at_eps), caption))
    return section
