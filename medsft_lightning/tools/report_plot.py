"""The training curves of ``medsft compare``'s report: a run's ``metrics.csv`` drawn as an inline SVG.

Lightning's CSVLogger writes one row per logging call, with a column for every metric ever logged and the
others empty (a training step's row has ``train_loss`` and ``lr``, a validation's ``val_loss``), so each series
takes the rows where its column holds a number. The plot is drawn by hand (polylines, axes, ticks, a legend;
no plotting library): losses on the left axis, the learning rate on the right one.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path

SERIES = {"train_loss": ("#4c78a8", "left"), "val_loss": ("#e45756", "left"), "lr": ("#8a8a8a", "right")}
WIDTH, HEIGHT = 880, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 76, 16, 44


def read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{series: [(step, value), …]}`` for :data:`SERIES` present in a CSVLogger ``metrics.csv``.

    Rows whose cell is empty or not a finite number are skipped; a series with no point is left out.

    Args:
        path: the run's ``metrics.csv``.
    """
    curves: dict[str, list[tuple[float, float]]] = {name: [] for name in SERIES}
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            step = _number(row.get("step"))
            if step is None:
                continue
            for name, points in curves.items():
                value = _number(row.get(name))
                if value is not None:
                    points.append((step, value))
    return {name: sorted(points) for name, points in curves.items() if points}


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """``count`` evenly spaced values from ``low`` to ``high`` (both included)."""
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def _span(values: list[float], floor_zero: bool = False) -> tuple[float, float]:
    low, high = (0.0 if floor_zero else min(values)), max(values)
    if high - low < 1e-12:
        low, high = low - 0.5 if not floor_zero else low, high + 0.5
    pad = 0.0 if floor_zero else (high - low) * 0.05
    return low - pad, high + pad


class _Frame:
    """Plot coordinates: steps to x, values to y on the ``left`` (losses) or ``right`` (lr) axis."""

    def __init__(self, curves: dict[str, list[tuple[float, float]]]) -> None:
        steps = [s for points in curves.values() for s, _ in points]
        self.x_low, self.x_high = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        losses = [v for name in ("train_loss", "val_loss") for _, v in curves.get(name, [])]
        self.spans = {}
        if losses:
            self.spans["left"] = _span(losses)
        if "lr" in curves:
            self.spans["right"] = _span([v for _, v in curves["lr"]], floor_zero=True)
        self.width, self.height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(self, step: float) -> float:
        return LEFT + (step - self.x_low) / (self.x_high - self.x_low) * self.width

    def y(self, value: float, axis: str) -> float:
        low, high = self.spans[axis]
        return TOP + self.height - (value - low) / (high - low) * self.height


def _axes(frame: _Frame) -> list[str]:
    """The plot's frame, the step axis, and a value axis (ticks and title) for each side in use."""
    bottom = TOP + frame.height
    parts = [f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{frame.width}" height="{frame.height}" fill="none" '
             f'stroke="#bbb"/>']
    for tick in _ticks(frame.x_low, frame.x_high):
        parts.append(f'<line class="tick" x1="{frame.x(tick):.1f}" x2="{frame.x(tick):.1f}" y1="{bottom}" '
                     f'y2="{bottom + 5}" stroke="#888"/><text x="{frame.x(tick):.1f}" y="{bottom + 18}" '
                     f'text-anchor="middle">{tick:.0f}</text>')
    parts.append(f'<text class="axis-title" x="{LEFT + frame.width / 2}" y="{HEIGHT - 6}" '
                 f'text-anchor="middle">step</text>')
    for axis, label in (("left", "loss"), ("right", "lr")):
        if axis not in frame.spans:
            continue
        edge, anchor, shift = (LEFT, "end", -6) if axis == "left" else (LEFT + frame.width, "start", 6)
        for tick in _ticks(*frame.spans[axis]):
            y = frame.y(tick, axis)
            parts.append(f'<line class="tick" x1="{edge}" x2="{edge + shift / 1.2:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'stroke="#888"/><text x="{edge + shift}" y="{y + 4:.1f}" text-anchor="{anchor}">'
                         f"{tick:.3g}</text>")
        title_x, title_y = (14 if axis == "left" else WIDTH - 10), TOP + frame.height / 2
        parts.append(f'<text class="axis-title" x="{title_x}" y="{title_y}" text-anchor="middle" '
                     f'transform="rotate(-90 {title_x} {title_y})">{label}</text>')
    return parts


def curves_svg(curves: dict[str, list[tuple[float, float]]]) -> str:
    """An ``<svg id="curves">`` plot of ``curves`` (:func:`read_curves`): one polyline per series, and a legend.

    Args:
        curves: ``{series: [(step, value), …]}`` (at least one point); ``train_loss``/``val_loss`` on the left
            axis, ``lr`` on the right one.
    """
    frame = _Frame(curves)
    parts = [f'<svg id="curves" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
             f'aria-label="training curves: {", ".join(curves)} against step">', *_axes(frame)]
    for i, (name, points) in enumerate(curves.items()):
        color, axis = SERIES[name]
        coords = " ".join(f"{frame.x(s):.1f},{frame.y(v, axis):.1f}" for s, v in points)
        parts.append(f'<polyline class="series" data-series="{name}" data-points="{len(points)}" fill="none" '
                     f'stroke="{color}" stroke-width="2" points="{coords}"/>')
        if name == "val_loss" or len(points) == 1:
            parts += [f'<circle cx="{frame.x(s):.1f}" cy="{frame.y(v, axis):.1f}" r="3" fill="{color}">'
                      f'<title>{html.escape(name)} {v:.4g} at step {s:.0f}</title></circle>' for s, v in points]
        legend_x, legend_y = LEFT + frame.width - 120, TOP + 14 + 18 * i
        parts.append(f'<g class="legend" data-series="{name}"><line x1="{legend_x}" x2="{legend_x + 22}" '
                     f'y1="{legend_y}" y2="{legend_y}" stroke="{color}" stroke-width="3"/><text x="{legend_x + 28}" '
                     f'y="{legend_y + 4}">{name}{" (right axis)" if axis == "right" else ""}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def curve_notes(curves: dict[str, list[tuple[float, float]]]) -> list[str]:
    """Plain-text facts of the curves for the report: the first and lowest ``val_loss`` with their steps."""
    val = curves.get("val_loss") or []
    if not val:
        return ["metrics.csv holds no val_loss"]
    best = min(val, key=lambda p: p[1])
    return [f"val_loss at the first validation (step {val[0][0]:.0f}): {val[0][1]:.4f}",
            f"lowest val_loss (step {best[0]:.0f}; the exported best checkpoint when the run monitors it): "
            f"{best[1]:.4f}"]
