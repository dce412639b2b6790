"""Static pages from cards: one card's page and a sortable leaderboard of many.

Both are one self-contained HTML file (inline CSS; the leaderboard's sorting is a few lines of
inline JavaScript): no external request, so they open offline and can be attached to a paper.
They render the card's JSON and compute nothing (RobustBench's "results are data first").
"""

from __future__ import annotations

import html
import json
from typing import Any

from advseg.report.html import STYLE

_SORT = """
document.querySelectorAll("table.sortable th").forEach(function (th, col) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.dir !== "asc"; th.dataset.dir = up ? "asc" : "desc";
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y), c;
      if (isNaN(nx) && isNaN(ny)) { c = x.localeCompare(y); }
      else if (isNaN(nx)) { return 1; } else if (isNaN(ny)) { return -1; } else { c = nx - ny; }
      return up ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""
_EXTRA = """
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th::after { content: " \\2195"; color: #999; }
.reduced { color: #8a5a00; }
"""


def _number(value: Any, digits: int = 4) -> str:
    return "not measured" if value is None else f"{value:.{digits}f}"


def _eps(eps: float) -> str:
    return f"{eps:.3g} ({eps * 255:.3g}/255)"


def _row(cells: list[tuple[str, Any]], header: bool = False) -> str:
    tag = "th" if header else "td"
    parts = []
    for text, value in cells:
        sort = "" if header else f' data-v="{html.escape(str(value), quote=True)}"'
        parts.append(f"<{tag}{sort}>{html.escape(str(text))}</{tag}>")
    return "<tr>" + "".join(parts) + "</tr>"


def _training(model: dict[str, Any]) -> str:
    training = model.get("training") or {}
    seconds = training.get("seconds")
    time = "" if seconds is None else f"; {seconds:.0f} s"
    return f"{training.get('label', training.get('method', '?'))}{time}"


def _page(title: str, body: list[str], script: str = "") -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}{_EXTRA}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *body,
    ]
    if script:
        parts.append(f"<script>{script}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def interval_text(part: dict[str, Any]) -> str:
    """A number's interval as shown: ``[0.812, 0.901]``, or why there is none (fewer than 5
    cases: ``not meaningful: 2 cases, 8 slices (< 5 cases)``); empty for a card made before
    cards had intervals."""
    ci = part.get("interval")
    if not ci:
        return ""
    if not ci.get("meaningful"):
        return ci["text"].removesuffix("; bounds left out")
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _with_interval(value: str, part: dict[str, Any]) -> str:
    text = interval_text(part)
    if not text:
        return value
    return f"{value} {text}" if text.startswith("[") else f"{value} (no interval: {text})"


def result_rows(card: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """``(measure, value, 95% interval, computed on)`` for each number of the card."""
    results = card["results"]

    def on(part: dict[str, Any]) -> str:
        return f"{part['slices']} slices of {part['cases']} cases"

    clean = results["clean"]
    rows = [("clean Dice", _number(clean["dice"]), interval_text(clean), on(clean))]
    for at in results["sea"]["at"]:
        rows.append(
            (
                f"Dice under SEA, L-inf eps {_eps(at['eps'])}",
                f"{at['dice']:.4f} (AS {at['attack_success']:.3f})",
                interval_text(at),
                on(at),
            )
        )
    corruptions = results["corruptions"]
    if corruptions.get("dice") is None:
        rows.append(("corruption mean Dice", "not measured", "", corruptions.get("reason", "")))
    else:
        what = f"{len(corruptions['per_corruption'])} corruptions x 5 severities"
        mean = _number(corruptions["dice"])
        rows.append(
            (f"corruption mean Dice ({what})", mean, interval_text(corruptions), on(corruptions))
        )
        for name, dice in corruptions["per_corruption"].items():
            rows.append((f"  {name} (mean over severities)", _number(dice), "", on(corruptions)))
    certified = results["certified"]
    rows.append(
        (
            f"certified Dice, L2 radius {certified['radius']:g} (sigma {certified['sigma']:g})",
            f"{certified['dice']:.4f} ({certified['abstained']:.1%} pixels abstained)",
            interval_text(certified),
            on(certified),
        )
    )
    return rows


def card_page(card: dict[str, Any]) -> str:
    """One card as a page: the model, the numbers with what they were computed on, the
    protocol and its deviations."""
    model, settings = card["model"], card["protocol"]
    body = [
        f'<p class="warning">Warning: {html.escape(line)}.</p>' for line in card.get("warnings", [])
    ]
    if settings.get("deviations"):
        body.append(
            '<p class="warning">Reduced card, not the full protocol: '
            + html.escape("; ".join(settings["deviations"]))
            + ".</p>"
        )
    info = [
        ("name", model["name"]),
        ("architecture", model["architecture"]),
        ("parameters", f"{model['params'] / 1e6:.2f}M"),
        ("training", _training(model)),
        ("data", f"{model['data']['location']}: {model['data']['held_out_slices']} held-out "
                 f"slices of {model['data']['held_out_cases']} cases"),
        ("classes", ", ".join(model["classes"])),
        ("checkpoint", model["checkpoint"]),
    ]  # fmt: skip
    body.append("<h2>Model</h2>")
    body.append(_table(["what", "value"], [(a, b) for a, b in info]))
    body.append(f"<h2>Results (Dice protocol '{html.escape(settings['dice'])}')</h2>")
    body.append(
        _table(["measure", "value", "95% interval (case bootstrap)", "computed on"],
               result_rows(card))
    )  # fmt: skip
    body.append(
        '<p class="note">Intervals: 95% percentile bootstrap over cases (2000 draws, seed 0; '
        "the slices of one case resampled together). Below 5 cases there is none: a bootstrap "
        "over so few patients is not meaningful, and the numbers describe those cases only.</p>"
    )
    body.append(f"<h2>Protocol {html.escape(settings['version'])}</h2>")
    body.append(f"<pre>{html.escape(json.dumps(settings, indent=2))}</pre>")
    provenance = card.get("provenance") or {}
    body.append(
        '<p class="note">'
        + html.escape(
            f"Made {provenance.get('created', '?')} by advseg {provenance.get('advseg', '?')} "
            f"on {provenance.get('device', '?')} in {provenance.get('seconds', '?')} s; the "
            "numbers are in card.json beside this page."
        )
        + "</p>"
    )
    return _page(f"Robustness card: {model['name']}", body)


def _table(header: list[str], rows: list[tuple]) -> str:
    lines = ['<div class="wide"><table>', _row([(h, h) for h in header], header=True)]
    lines += [_row([(c, c) for c in row]) for row in rows]
    return "\n".join([*lines, "</table></div>"])


LEADERBOARD_COLUMNS = [
    "model", "architecture", "params (M)", "training", "clean Dice", "SEA 2/255", "SEA 4/255",
    "SEA 8/255", "corruptions", "certified Dice", "slices", "protocol",
]  # fmt: skip


def leaderboard_rows(cards: list[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    """One row per card: (shown text, sort value) per :data:`LEADERBOARD_COLUMNS`, sorted by
    the Dice under SEA at 8/255, best first."""
    rows = []
    for card in cards:
        model, results, settings = card["model"], card["results"], card["protocol"]
        sea = {round(a["eps_255"]): a for a in results["sea"]["at"]}
        certified = results["certified"]
        corruption = results["corruptions"].get("dice")
        reduced = settings.get("deviations") or []
        broken = any(line.startswith("clean Dice") for line in card.get("warnings", []))
        shown = f"{model['name']} (clean Dice < 0.1: broken)" if broken else model["name"]
        row = [
            (shown, model["name"]),
            (model["architecture"], model["architecture"]),
            (f"{model['params'] / 1e6:.2f}", model["params"]),
            (_training(model), (model.get("training") or {}).get("method", "")),
            (
                _with_interval(f"{results['clean']['dice']:.4f}", results["clean"]),
                results["clean"]["dice"],
            ),
            *[
                (_with_interval(f"{sea[k]['dice']:.4f}", sea[k]), sea[k]["dice"])
                if k in sea
                else ("n/a", "")
                for k in (2, 4, 8)
            ],
            (
                _with_interval(_number(corruption), results["corruptions"]),
                "" if corruption is None else corruption,
            ),
            (
                _with_interval(f"{certified['dice']:.4f} @ L2 {certified['radius']:g}", certified),
                certified["dice"],
            ),
            (
                f"{results['clean']['slices']} of {results['clean']['cases']} cases",
                results["clean"]["slices"],
            ),
            (
                settings["version"] + (" reduced: " + "; ".join(reduced) if reduced else ""),
                settings["version"],
            ),
        ]
        rows.append(row)
    return sorted(rows, key=lambda r: -r[7][1] if isinstance(r[7][1], float) else 1.0)


def leaderboard_page(cards: list[dict[str, Any]]) -> str:
    """A sortable table of ``cards`` (click a column to sort), best robust Dice first."""
    versions = sorted({card["protocol"]["version"] for card in cards})
    body = [
        '<p class="note">'
        + html.escape(
            f"{len(cards)} robustness cards. Dice under the '{cards[0]['protocol']['dice']}' "
            "protocol on each model's held-out cases; SEA in L-inf at eps 2/255, 4/255, 8/255; "
            "certified Dice by randomized smoothing at the stated L2 radius; [low, high]: 95% "
            "case-bootstrap interval (none below 5 cases: not meaningful). Sorted by the Dice "
            "under SEA at 8/255; click a column header to sort by it."
        )
        + "</p>"
    ]
    if len(versions) > 1:
        body.append(
            '<p class="warning">The cards come from different protocols ('
            + html.escape(", ".join(versions))
            + "): their numbers are not comparable.</p>"
        )
    if any(card["protocol"].get("deviations") for card in cards):
        body.append(
            '<p class="warning">Some cards are reduced (fewer slices, steps or samples than the '
            "protocol): see their protocol column.</p>"
        )
    lines = ['<div class="wide"><table class="sortable"><thead>']
    lines.append(_row([(c, c) for c in LEADERBOARD_COLUMNS], header=True))
    lines.append("</thead><tbody>")
    lines += [_row(row) for row in leaderboard_rows(cards)]
    lines.append("</tbody></table></div>")
    body.append("\n".join(lines))
    return _page("advseg robustness leaderboard", body, _SORT)
