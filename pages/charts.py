"""Plotly figures of the pages: drawing only. The numbers come in computed (core.views, core.leaderboard);
user strings (model, method and class names) go through core.views.plot_text, since Plotly renders a
subset of HTML in labels."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly import colors as px_colors

from core.views import COST_UNITS, Heatmap, PairMatrix, plot_text, points_by_class

SINGLE, ENSEMBLE, REFERENCE = "#9e9e9e", "#1f77b4", "#616161"


def board_bars(table: Sequence[Mapping], metric: str, k: int, best_single: float | None) -> go.Figure:
    """Ranked rows as horizontal bars: single models grey, ensembles blue, a dashed line at the best single."""
    figure = go.Figure(go.Bar(
        x=[r[metric] for r in table], y=[f"{i}. {plot_text(r['method'])}" for i, r in enumerate(table, start=1)],
        orientation="h", marker_color=[SINGLE if r["type"] == "single" else ENSEMBLE for r in table],
        text=[f"{r[metric]:.4f}" for r in table], textposition="auto"))
    if best_single is not None:
        # The label sits above the plot area (paper y > 1), clear of the bars and their value labels.
        figure.add_vline(x=best_single, line_dash="dash", line_color=REFERENCE)
        figure.add_annotation(x=best_single, xref="x", y=1, yref="paper", yanchor="bottom", showarrow=False,
                              text=f"best single {best_single:.4f}", font={"size": 11, "color": REFERENCE})
    figure.update_layout(title=f"{metric} (k={k}): single models (grey) vs ensembles (blue)",
                         height=140 + 28 * len(table), yaxis={"autorange": "reversed"},
                         margin={"l": 10, "r": 10, "t": 64, "b": 10})
    return figure


def class_difference(rows: Sequence[Mapping], metric: str) -> go.Figure:
    """Per-class B - A bars (core.explorer.per_class_difference)."""
    return go.Figure(go.Bar(x=[plot_text(r["class"]) for r in rows], y=[r["B - A"] for r in rows],
                            marker_color=["#2e7d32" if r["B - A"] >= 0 else "#c62828" for r in rows])
                     ).update_layout(title=f"{metric}: B − A per class", height=320)


def weight_heatmap(grid: Heatmap, metric: str, x_title: str, y_title: str) -> go.Figure:
    """A metric over two models' weights. Categorical axes: one equal cell per weight value, ticks labelled
    by the values (a numeric axis gave uneven cells and ticks at -0.5); never-scored cells stay blank."""
    figure = go.Figure(go.Heatmap(
        z=grid.z, x=[f"{c:g}" for c in grid.columns], y=[f"{r:g}" for r in grid.rows], colorscale="Viridis",
        text=grid.labels(), texttemplate="%{text}", colorbar={"title": metric}))
    figure.update_layout(xaxis={"type": "category"}, yaxis={"type": "category"},
                         xaxis_title=plot_text(x_title), yaxis_title=plot_text(y_title), height=480,
                         title=f"{metric} over weights (oracle)")
    return figure


def weight_profiles(profiles: Mapping[str, Sequence[tuple[float, float]]], metric: str) -> go.Figure:
    """One line per model (core.views.best_by_weight): the best `metric` at each of its weight values."""
    figure = go.Figure()
    for model, points in profiles.items():
        figure.add_trace(go.Scatter(x=[w for w, _ in points], y=[v for _, v in points], mode="lines+markers",
                                    name=plot_text(model)))
    return figure.update_layout(title=f"best {metric} at each weight of a model, the others at their best (oracle)",
                                xaxis_title="weight", yaxis_title=metric, height=400,
                                margin={"l": 10, "r": 10, "t": 40, "b": 10},
                                legend={"orientation": "h", "y": -0.25})  # below the axis title, not over it


def training_curve(points: Sequence[Mapping], k: int) -> go.Figure | None:
    """Train loss (right axis) and validation / eval map@k (left) per epoch; None before the first epoch."""
    if not points:
        return None
    epochs = [p.get("epoch") for p in points]
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=epochs, y=[p.get("loss") for p in points], name="train loss", yaxis="y2",
                                line={"dash": "dot"}))
    for column, name in (("val_map", f"val map@{k} (train part)"), ("eval_map", f"eval map@{k}")):
        if any(column in p for p in points):
            figure.add_trace(go.Scatter(x=epochs, y=[p.get(column) for p in points], name=name, mode="lines+markers"))
    figure.update_layout(height=340, xaxis_title="epoch", yaxis_title="map@k",
                         yaxis2={"title": "loss", "overlaying": "y", "side": "right"},
                         margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h"})
    return figure


def run_bars(table: Sequence[Mapping], metric: str = "map@k") -> go.Figure:
    # Numbered labels: a sweep holds the same method under several weight vectors (bars must not stack).
    return go.Figure(go.Bar(x=[r[metric] for r in table],
                            y=[f"{i}. {plot_text(r['method'])}" for i, r in enumerate(table, start=1)],
                            orientation="h")
                     ).update_layout(title=metric, yaxis={"autorange": "reversed"}, height=120 + 26 * len(table))


# Above this many points WebGL draws faster than SVG; below it SVG starts sooner (no GL context to create,
# which costs most where the browser has no GPU and emulates WebGL).
WEBGL_FROM_POINTS = 2_000
LEGEND_CLASSES = 40
PALETTE = px_colors.qualitative.Dark24


def embedding_map(labels: np.ndarray, coords: np.ndarray, ids: np.ndarray, class_names: Sequence[str],
                  title: str) -> go.Figure:
    """Points coloured by class (`labels`: class index per point); each carries its dataset row in customdata.
    Up to LEGEND_CLASSES classes: a trace (and a legend entry) per class. Above that a legend is unreadable
    and a thousand WebGL traces take seconds to draw, so classes share the colours of a repeating palette
    (a trace per colour), the class shown on hover."""
    labels = np.asarray(labels)
    scatter = go.Scattergl if len(ids) > WEBGL_FROM_POINTS else go.Scatter
    figure = go.Figure()
    groups = points_by_class(labels, len(class_names))
    if len(groups) <= LEGEND_CLASSES:
        for c, members in groups:
            figure.add_trace(scatter(
                x=coords[members, 0], y=coords[members, 1], mode="markers", name=plot_text(class_names[c]),
                marker={"size": 6, "opacity": 0.8}, customdata=ids[members],
                hovertemplate="#%{customdata} · %{fullData.name}<extra></extra>"))
    else:
        names = np.array([plot_text(name) for name in class_names], dtype=object)
        for colour, shade in enumerate(PALETTE):  # a trace per colour: cheaper to draw than a colour per point
            members = np.flatnonzero(labels % len(PALETTE) == colour)
            figure.add_trace(scatter(
                x=coords[members, 0], y=coords[members, 1], mode="markers", text=names[labels[members]],
                customdata=ids[members], marker={"size": 4, "opacity": 0.8, "color": shade},
                hovertemplate="#%{customdata} · %{text}<extra></extra>"))
        title += f" · {len(groups):,} classes: colours repeat, hover a point for its class"
    figure.update_layout(height=600, title=plot_text(title), legend={"itemsizing": "constant"}, dragmode="select",
                         showlegend=len(groups) <= LEGEND_CLASSES, margin={"l": 10, "r": 10, "t": 40, "b": 10})
    return figure


def pareto(rows: Sequence[Mapping], metric: str, k: int, by: str) -> go.Figure:
    """Each priced method (core.views.cost_rows) at its cost and `metric`, single models grey, ensembles
    blue, and the Pareto front (nothing both cheaper and better) as a line through its members."""
    unit = COST_UNITS[by][0]
    priced = [r for r in rows if r["cost"] is not None]
    front = sorted((r for r in priced if r["pareto"]), key=lambda r: r["cost"])
    figure = go.Figure(go.Scatter(
        x=[r["cost"] for r in priced], y=[r[metric] for r in priced], mode="markers", name="method",
        marker={"size": 10, "color": [SINGLE if r["type"] == "single" else ENSEMBLE for r in priced]},
        text=[plot_text(r["method"]) for r in priced], hovertemplate=f"%{{text}}<br>%{{x:.4g}} {unit}<br>"
                                                                   f"{metric} %{{y:.4f}}<extra></extra>"))
    figure.add_trace(go.Scatter(x=[r["cost"] for r in front], y=[r[metric] for r in front], mode="lines+text",
                                name="Pareto front", line={"dash": "dot", "color": REFERENCE}, textposition="top left",
                                text=[plot_text(r["method"]) for r in front], hoverinfo="skip"))
    return figure.update_layout(title=f"{metric} (k={k}) against cost: {unit}", xaxis_title=unit, yaxis_title=metric,
                                height=420, showlegend=False, margin={"l": 10, "r": 10, "t": 40, "b": 10})


def pair_matrix(matrix: PairMatrix) -> go.Figure:
    """A models x models complementarity matrix with its values written in the cells; undefined cells blank."""
    names = [plot_text(m) for m in matrix.models]
    labels = [[f"{v:.3f}" if v == v else "" for v in row] for row in matrix.z]
    figure = go.Figure(go.Heatmap(z=matrix.z, x=names, y=names, text=labels, texttemplate="%{text}",
                                  colorscale="Viridis", zmin=matrix.zmin, zmax=matrix.zmax))
    return figure.update_layout(title=plot_text(matrix.title), height=200 + 40 * len(names),
                                xaxis={"type": "category"}, yaxis={"type": "category", "autorange": "reversed"},
                                margin={"l": 10, "r": 10, "t": 40, "b": 10})


def selection_path(points: Sequence[Mapping]) -> go.Figure:
    """map@k on train at each greedy step and refinement round (core.views.selection_path)."""
    figure = go.Figure()
    for phase, dash in (("greedy", "solid"), ("refined", "dot")):
        part = [p for p in points if p["phase"] == phase]
        if part:
            figure.add_trace(go.Scatter(x=[p["step"] for p in part], y=[p["map@k"] for p in part], name=phase,
                                        mode="lines+markers", line={"dash": dash}, text=[p["weights"] for p in part],
                                        hovertemplate="step %{x}: map@k %{y:.4f}<br>weights %{text}<extra></extra>"))
    return figure.update_layout(title="Greedy selection on train: map@k after each step, then refinement",
                                xaxis_title="step", yaxis_title="map@k (train)", height=340,
                                margin={"l": 10, "r": 10, "t": 40, "b": 10}, legend={"orientation": "h"})
