"""The report of a run: tables, figures and one self-contained HTML page, from records only.

It opens with its provenance (:mod:`advseg.report.provenance`: advseg version, data and whether
it is the synthetic phantom, config, device, dates, a warning per broken model).

:func:`write_report` reads a run directory's ``records/*.parquet`` (and, for the example panels,
``examples/*.npz``), never a model, so it can be re-run at any time. It writes into
``RUN_DIR/report/``: ``report.html`` (figures embedded), ``report.md``, one CSV per table with the
raw numbers, each figure as PNG and as SVG (vector, for papers). Every DSC and Attack Success
comes from :mod:`advseg.stats.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from advseg.atomic import check_output_dir, staged_dir, write_bytes_atomic, write_text_atomic
from advseg.config import load_yaml
from advseg.data.location import PHANTOM_LABEL, describe, is_synthetic, phantom_note, run_locations
from advseg.errors import UserError
from advseg.report import (
    convergence,
    corruptions,
    cross_model,
    curves,
    defences,
    figures,
    provenance,
    sizes,
    tables,
    training,
)
from advseg.report.claims import claim_sections
from advseg.report.examples import panel_section
from advseg.report.html import (
    Block,
    Section,
    eps_text,
    format_table,
    render_html,
    render_markdown,
)
from advseg.report.stats import MIN_POINTS, correlate
from advseg.runs.names import file_stem
from advseg.runs.records import read_records, white_box
from advseg.stats.bootstrap import MIN_CASES, with_intervals
from advseg.stats.summary import DEFAULT_PROTOCOL, PROTOCOLS, UNITS


@dataclass
class Report:
    """What :func:`write_report` wrote.

    Attributes:
        html, markdown: the report's two pages.
        files: every file written (pages, CSV, PNG).
        table: Table II at ``eps`` (as :func:`advseg.stats.summary.summarize` returns it).
        cells: its numbers one row per (model, attack, loss) at ``eps``, as
            :func:`advseg.stats.summary.summarize_cells` returns them.
        protocol: the Dice protocol used; eps: the headline eps.
        notes: what could not be drawn, and why (also stated in the report).
        locations: the data sets the records were computed on (``synthetic`` for the phantom,
            or paths; :func:`advseg.data.location.run_locations`), empty when the run does not
            say.
        warnings: one line per model whose clean DSC is below
            :data:`advseg.report.provenance.BROKEN_DICE` (also at the top of the report).
    """

    html: Path
    markdown: Path
    table: pd.DataFrame
    cells: pd.DataFrame
    protocol: str
    eps: float
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    locations: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def write_report(
    run_dir: str | Path,
    *,
    protocol: str | None = None,
    eps: float | None = None,
    out_dir: str | Path | None = None,
    baseline: str | None = None,
) -> Report:
    """Write the report of ``run_dir`` from its records.

    Args:
        run_dir: a run directory (with ``records/``).
        protocol: Dice protocol; default: the run's ``evaluation.protocol``, else ``per-class``.
        eps: the eps of Table II and the per-eps figures; default: the eps with the most results.
        out_dir: where to write; default ``run_dir/report``.
        baseline: the model the corruption section's mCE is relative to; default the run's
            ``corruption_baseline`` (an experiment's), else
            :func:`advseg.report.corruptions.choose_baseline`'s (the first undefended model).

    Raises:
        UserError: no records, a broken records or examples file, an eps not in the records.
    """
    run_dir = Path(run_dir)
    every_record = read_records(run_dir)
    records = white_box(every_record)  # Table II and the figures: white-box cells only
    corrupted = records[records["corruption"] != ""]  # the corruption section's
    if len(corrupted) < len(records):  # the attack sections: attack cells (if any)
        records = records[records["corruption"] == ""]
    protocol = protocol or _run_protocol(run_dir)
    if protocol not in PROTOCOLS:
        valid = ", ".join(PROTOCOLS)
        raise UserError(f"--protocol: unknown Dice protocol {protocol!r}; valid: {valid}")
    available = sorted(records["eps"].unique())
    eps = tables.headline_eps(records) if eps is None else float(eps)
    if not any(abs(eps - e) < 1e-12 for e in available):
        listed = ", ".join(f"{e:g}" for e in available)
        raise UserError(f"--eps: {eps:g} is not in the records of {run_dir} (they have {listed})")
    eps = next(e for e in available if abs(eps - e) < 1e-12)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    check_output_dir(out, "report directory")
    with staged_dir(out) as stage:  # a failure (a full disk) leaves no file of a half report
        baseline = baseline or _run_baseline(run_dir)
        report = _write_sections(run_dir, records, every_record, corrupted, protocol, eps,
                                 _Writer(stage), baseline)  # fmt: skip
    moved = [out / path.relative_to(stage) for path in report.files]
    return replace(report, html=out / "report.html", markdown=out / "report.md", files=moved)


def _write_sections(
    run_dir: Path,
    records: pd.DataFrame,
    every_record: pd.DataFrame,
    corrupted: pd.DataFrame,
    protocol: str,
    eps: float,
    writer: _Writer,
    baseline: str | None = None,
) -> Report:
    """The report's sections and files, written by ``writer`` (into its staging directory);
    ``baseline``: the corruption section's mCE baseline (None: its default)."""

    table_ii = tables.table_ii(records, protocol, eps)
    cells = tables.cells_table(records, protocol)
    at_eps = cells[cells["eps"] == eps]
    headline_cells = at_eps.rename(columns={"attack_success": "as"})
    classes = list(records["class"].drop_duplicates())
    locations = run_locations(run_dir)
    left_out = applies(records, eps)
    sections = [
        provenance.section(writer, run_dir, records, table_ii, protocol, locations),
        _table_section(writer, records[records["eps"] == eps], protocol, eps, locations),
        *curves.sections(writer, records),
        *corruptions.sections(writer, run_dir, corrupted, protocol, classes, baseline),
        *sizes.sections(writer, records[records["corruption"] == ""], corrupted, eps),
        _eps_section(writer, cells),
        panel_section(writer, run_dir, records[records["eps"] == eps], protocol, classes, eps),
        _loss_section(writer, at_eps, eps),
        *([] if "params" in left_out else [_params_section(writer, at_eps, eps)]),
        *(
            []
            if "luminosity" in left_out
            else [_luminosity_section(writer, records, eps, protocol)]
        ),
        _class_section(writer, records, protocol, eps),
        *claim_sections(
            writer,
            records,
            protocol,
            eps,
            params="params" not in left_out,
            luminosity="luminosity" not in left_out,
        ),
        *cross_model.sections(writer, run_dir, every_record, protocol, eps),
        *training.sections(writer, run_dir, every_record, protocol, eps),
        *convergence.sections(writer, run_dir, eps),
    ]
    sections += defences.sections(writer, run_dir, records, protocol, eps)
    if left_out:
        reasons = [writer.note(reason) for reason in left_out.values()]
        sections.append(Section("Sections left out of this run's report", reasons))
    cell_files = len(list((run_dir / "records").glob("*.parquet")))
    intro = (
        f"Run {run_dir.resolve()}: {len(records)} records from {cell_files} cell "
        f"file{'s' if cell_files != 1 else ''}; "
        f"models {', '.join(map(str, records['model'].unique()))}; "
        f"Dice protocol '{protocol}'; main eps {eps_text(eps)}. Every number below is "
        "computed from these records (advseg.summary); the CSV file named beside each table or "
        "figure holds its numbers."
    )
    intro = f"{data_sentence(locations)} {intro}" if locations else intro
    title = "advseg robustness report"
    html_path = writer.text("report.html", render_html(title, intro, sections))
    md_path = writer.text("report.md", render_markdown(title, intro, sections))
    return Report(
        html_path, md_path, table_ii, headline_cells, protocol, eps, writer.files, writer.notes,
        locations, provenance.warnings_for(table_ii, protocol),
    )  # fmt: skip


PAPER_ATTACKS = ("fgsm", "fgsm:notebook")
"""The paper's attack: its luminosity question is about FGSM cells."""


def applies(records: pd.DataFrame, eps: float) -> dict[str, str]:
    """The paper's sections that cannot apply to these white-box records, each with its reason.

    ``params`` (parameter count against Attack Success, the figure and the claim): needs
    :data:`~advseg.report.stats.MIN_POINTS` models or more, else a correlation over models is
    a line through two points. ``luminosity`` (slice luminosity against Attack Success): the
    paper's grid, that is its attack (:data:`PAPER_ATTACKS`) at ``eps`` on that many models;
    on other runs its scatter plots fit lines through clouds that answer another question.
    """
    reasons = {}
    models = records["model"].nunique()
    if models < MIN_POINTS:
        reasons["params"] = (
            f"Parameter count against Attack Success: {models} model(s), fewer than "
            f"{MIN_POINTS}; no correlation over models can be tested, so neither the figure "
            "nor the claim is drawn."
        )
    at_eps = records[np.isclose(records["eps"], eps)]
    paper = at_eps[at_eps["attack"].isin(PAPER_ATTACKS)]
    if paper["model"].nunique() < MIN_POINTS:
        reasons["luminosity"] = (
            "Slice luminosity against Attack Success (the paper's future work): it needs the "
            f"paper's grid, FGSM at eps {eps:g} on {MIN_POINTS} or more models; this run has "
            f"{paper['model'].nunique()}, so it is not drawn."
        )
    return reasons


def _run_protocol(run_dir: Path) -> str:
    config = run_dir / "config.yaml"
    if config.exists():
        data = load_yaml(config) or {}
        protocol = (data.get("evaluation") or {}).get("protocol")
        if protocol:
            return str(protocol)
    return DEFAULT_PROTOCOL


def _run_baseline(run_dir: Path) -> str | None:
    """An experiment's ``corruption_baseline`` (its ``config.yaml``), else None."""
    config = run_dir / "config.yaml"
    if config.exists():
        value = (load_yaml(config) or {}).get("corruption_baseline")
        if value:
            return str(value)
    return None


class _Writer:
    """Writes the report's files atomically and remembers them, and what was left out."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: list[Path] = []
        self.notes: list[str] = []

    def text(self, name: str, text: str) -> Path:
        write_text_atomic(self.out / name, text)
        self.files.append(self.out / name)
        return self.out / name

    def table(self, name: str, frame: pd.DataFrame, caption: str) -> Block:
        self.text(f"{name}.csv", frame.to_csv(index=False, na_rep="n/a"))
        return Block("table", caption, table=format_table(frame), file=f"{name}.csv")

    def figure(self, name: str, figure: object, caption: str) -> Block:
        """The figure as ``name.png`` (embedded in the HTML) and ``name.svg`` beside it."""
        rendered = figures.render(figure, ("png", "svg"))
        for kind, data in rendered.items():
            write_bytes_atomic(self.out / f"{name}.{kind}", data)
            self.files.append(self.out / f"{name}.{kind}")
        return Block("figure", caption, png=rendered["png"], file=f"{name}.png")

    def note(self, text: str) -> Block:
        self.notes.append(text)
        return Block("text", text)


def data_sentence(locations: list[str]) -> str:
    """The report's sentence on its data: the phantom said plainly, else the data sets."""
    if all(is_synthetic(x) for x in locations):
        return (
            f"Data: the {PHANTOM_LABEL} (generated images, not patient data); these numbers say "
            "how the pipeline behaves, not how the models would do on patients."
        )
    return f"Data: {', '.join(describe(x) for x in locations)}."


def _table_section(
    writer: _Writer, records: pd.DataFrame, protocol: str, eps: float, locations: list[str]
) -> Section:
    table = with_intervals(records, protocol)
    note = phantom_note(locations)
    caption = "" if note is None else f"{note.capitalize()}. "
    caption += (
        f"Table II at eps {eps_text(eps)}: DSC clean and under each (attack, loss, eps), "
        f"Attack Success AS = (DSC_clean - DSC_adv) / DSC_clean. 'units': {UNITS[protocol][0]} "
        f"(averaged); 'excluded': {UNITS[protocol][1]} (left out). '<number> low' / 'high': its "
        f"95% confidence interval from a bootstrap over cases ({table.attrs['draws']} draws, seed "
        f"{table.attrs['seed']}; the slices of one case are resampled together)."
    )
    if table.attrs["seeds"] > 1:
        caption += (
            f" Models trained with {table.attrs['seeds']} training seeds: each number is the "
            "mean over seeds, '<number> seed sd' its standard deviation over seeds, and each "
            "bootstrap draw resamples the same cases for every seed."
        )
    if "folds" in table.columns:
        pooled = ", ".join(f"{m} ({k} folds)" for m, k in zip(table["model"], table["folds"],
                                                             strict=True) if k)  # fmt: skip
        caption += (
            f" Cross-validated: {pooled}; each model's numbers pool its folds' records, every "
            "case scored once by the fold model that did not train on it ('fold' in the "
            "records), and the bootstrap resamples the pooled cases."
        )
    few = table.attrs.get("few_cases", [])
    if few:
        caption += (
            f" Fewer than {MIN_CASES} test cases for {', '.join(str(k[0]) for k in few)}: "
            "a bootstrap over so few patients is not meaningful, so those intervals are left "
            "out (n/a; 'interval' says why) and the numbers describe these cases only."
        )
    caption += attack_settings(records)
    blocks = [writer.table("table2", table, caption)]
    left_out = [c for c in table.columns if few and c.endswith((" low", " high"))]  # said above
    if table.drop(columns=left_out).isna().to_numpy().any():
        blocks.append(writer.note("n/a: no unit left to average (or a clean DSC of 0 for AS)."))
    return Section(f"Table II (Dice protocol '{protocol}', eps {eps_text(eps)})", blocks)


def attack_settings(records: pd.DataFrame) -> str:
    """The caption's sentence naming each attack's budget beyond eps (the records'
    ``attack_setting``: which SEA preset, steps per member and members ran); "" when none has
    one."""
    named = records.loc[records["attack_setting"] != "", ["attack", "attack_setting"]]
    pairs = named.drop_duplicates().itertuples(index=False)
    said = "; ".join(f"{attack}: {setting}" for attack, setting in pairs)
    return f" Attack settings: {said}." if said else ""


def _eps_section(writer: _Writer, cells: pd.DataFrame) -> Section:
    section = Section("DSC against eps")
    swept = cells.groupby(["attack", "loss"])["eps"].nunique()
    if (swept >= 2).any():
        section.blocks.append(
            writer.figure(
                "dsc_vs_eps",
                figures.dsc_vs_eps(cells),
                "DSC under attack against eps, one line per model (eps 0: clean DSC).",
            )
        )
    else:
        section.blocks.append(
            writer.note("No (attack, loss) was evaluated at two or more eps values: no curve.")
        )
    caption = (
        "Every (model, attack, loss, eps) cell of the run. HD95: the 95th-percentile Hausdorff "
        "distance, mean over the (slice, class) pairs where both masks are non-empty (HD95 "
        "pairs; HD95 excluded: left out), in model pixels (px) and, where the data gives pixel "
        "spacings, millimetres (mm: spacing x resize factor)."
    )
    section.blocks.append(writer.table("cells", tables.with_units(cells), caption))
    return section


def _loss_section(writer: _Writer, at_eps: pd.DataFrame, eps: float) -> Section:
    figure = figures.loss_comparison(at_eps)
    return Section(
        "Attack loss comparison",
        [
            writer.figure(
                "loss_comparison",
                figure,
                f"Attack Success per model and attack loss at eps {eps:g} (the paper's Figure 8).",
            )
        ],
    )


def _params_section(writer: _Writer, at_eps: pd.DataFrame, eps: float) -> Section:
    points = at_eps.assign(
        series=at_eps["attack"] + " / " + at_eps["loss"], params_m=at_eps["params"] / 1e6
    )
    stats = tables.correlation_table(points, ["series"], "params_m")
    correlations = {
        name: correlate(f["params_m"], f["attack_success"], names=("parameters", "AS"))
        for name, f in points.groupby("series")
    }
    caption = (
        "Pearson and Spearman correlation of parameters and Attack Success over models; "
        "p_method: exact (every pairing of the models), permutation or asymptotic."
    )
    correlation = writer.table("params_correlation", stats, caption)
    figure = figures.scatter_with_stats(
        points,
        "params_m",
        "attack_success",
        "series",
        correlations,
        xlabel="parameters (millions)",
        ylabel="Attack Success",
        title=f"Parameter count against Attack Success (eps {eps:g}), one point per model",
    )
    writer.text("params_vs_attack_success.csv", points.to_csv(index=False, na_rep="n/a"))
    caption = (
        "The paper claims a negligible correlation; tested per attack / loss "
        "(points: params_vs_attack_success.csv)."
    )
    return Section(
        "Parameter count against Attack Success",
        [writer.figure("params_vs_attack_success", figure, caption), correlation],
    )


def _luminosity_section(
    writer: _Writer, records: pd.DataFrame, eps: float, protocol: str
) -> Section:
    per_slice = tables.slice_table(records[records["eps"] == eps])
    points = per_slice.slices.assign(
        series=per_slice.slices["attack"] + " / " + per_slice.slices["loss"]
    )
    writer.text("luminosity_vs_attack_success.csv", points.to_csv(index=False, na_rep="n/a"))
    section = Section("Slice luminosity against Attack Success")
    for series, frame in points.groupby("series", sort=True):
        correlations = {
            str(m): correlate(
                f["luminosity"], f["attack_success"], names=("luminosity", "AS"), cases=f["case"]
            )
            for m, f in frame.groupby("model")
        }
        figure = figures.scatter_with_stats(
            frame,
            "luminosity",
            "attack_success",
            "model",
            correlations,
            xlabel="slice luminosity (mean image intensity, range [0, 1])",
            ylabel="Attack Success of the slice",
            title=f"Luminosity against Attack Success, {series}, eps {eps:g}, one point per slice",
        )
        name = f"luminosity_{file_stem(series)}"
        section.blocks.append(
            writer.figure(name, figure, f"{series}: points in luminosity_vs_attack_success.csv")
        )
    stats = tables.correlation_table(points, ["model", "attack", "loss"], "luminosity")
    section.blocks.append(
        writer.table(
            "luminosity_correlation",
            stats,
            "Pearson and Spearman correlation of slice luminosity and the slice's Attack Success.",
        )
    )
    section.blocks.append(
        Block(
            "text",
            f"Per-slice DSC: the mean over the classes with a mask in the slice (this is the "
            f"report's own per-slice view, not the '{protocol}' protocol). Left out: "
            f"{per_slice.no_ground_truth} slice results with no mask at all, "
            f"{per_slice.clean_zero} with a clean DSC of 0 (Attack Success undefined).",
        )
    )
    return section


def _class_section(writer: _Writer, records: pd.DataFrame, protocol: str, eps: float) -> Section:
    table = tables.per_class_table(records, protocol, eps)
    return Section(
        "Per-class breakdown",
        [
            writer.table(
                "per_class",
                table,
                f"Table II computed on each class's records alone, eps {eps:g}.",
            )
        ],
    )
