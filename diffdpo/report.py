"""One-page HTML report of a comparison run: results table, training curves, listenable examples.

A demo or eval command writes its numbers and media first, then calls :func:`write_report` so a
person can check the claim in a browser: the table with bootstrap intervals, the curves the runs
trained along, and per example each model's audio next to a spectrogram (a failed event order or
a missing sound is visible before it is heard). The page needs no network and no JS; curves are
hand-written SVG and spectrograms are PNGs computed with numpy, so nothing beyond numpy,
soundfile and Pillow is required. Every string taken from ``results`` is HTML-escaped.

``results`` (media paths relative to ``out_dir``; every key but ``title``/``table`` optional)::

    title, summary, settings (any JSON),
    table: [{metric, n, higher_is_better, models: {name: {mean, ci95}}, deltas: {name: {mean, ci95}}}],
    curves: {run: [{step, loss, "rewards/accuracies", ...}]},
    interval_charts: [{title, xlabel, series: {name: [{x, mean, ci95}]}}]   (points with CI bars),
    examples: [{caption, seed, media: {model: path}, verdict: {model: text}}]
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np

log = logging.getLogger(__name__)

CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")
AUDIO_EXTENSIONS = {".wav", ".flac", ".ogg", ".mp3", ".aif", ".aiff"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
SPEC_SIZE = (256, 96)  # width x height of each spectrogram PNG
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
# Anchors of a viridis-like map (dark blue -> green -> yellow): perceptually ordered, prints in grey.
_CMAP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3}.better{color:#080;font-weight:600}.worse{color:#b00;font-weight:600}
.charts svg{margin:0 1em 1em 0;border:1px solid #eee}.models{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;padding:.5em;border:1px solid #ddd}figure img{display:block}.missing{color:#b00}
pre{background:#f7f7f7;padding:.5em;overflow:auto}.ci{color:#666}"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return _e(x)
    return str(x) if isinstance(x, int) else f"{x:.3g}"


def _ci(stat: dict) -> tuple[float, float] | None:
    """``ci95`` as ``(low, high)``; accepts a pair or an ``Interval.as_dict()``-style mapping."""
    ci = stat.get("ci95")
    if isinstance(ci, dict):
        ci = (ci.get("low"), ci.get("high"))
    if not ci or len(ci) != 2 or any(not isinstance(v, (int, float)) for v in ci):
        return None
    return float(ci[0]), float(ci[1])


def delta_mark(ci: tuple[float, float] | None, higher_is_better: bool | None) -> str:
    """``"better"``/``"worse"`` when the interval excludes zero, by the metric's direction; else ``""``.

    With no direction known, an interval above zero counts as "better" (a plain difference).
    """
    if ci is None:
        return ""
    low, high = ci
    sign = 1 if low > 0 else -1 if high < 0 else 0
    if sign == 0:
        return ""
    if higher_is_better is False:
        sign = -sign
    return "better" if sign > 0 else "worse"


def _stat_cell(stat, higher_is_better=None, delta=False) -> str:
    if not isinstance(stat, dict) or "mean" not in stat:
        return "<td></td>"
    ci = _ci(stat)
    text = _fmt(stat["mean"]) + (f' <span class="ci">[{_fmt(ci[0])}, {_fmt(ci[1])}]</span>' if ci else "")
    mark = delta_mark(ci, higher_is_better) if delta else ""
    if mark:
        symbol = "\u25b2" if mark == "better" else "\u25bc"
        return f'<td class="{mark}" title="95% CI excludes 0: {mark}">{text} {symbol}</td>'
    return f"<td>{text}</td>"


def _ordered_keys(rows, field) -> list[str]:
    keys: list[str] = []
    for row in rows:
        for k in (row.get(field) or {}):
            if k not in keys:
                keys.append(k)
    return keys


def render_table(rows: list[dict]) -> str:
    """Metric rows x (each model, each delta) with mean and [low, high]; deltas marked by direction."""
    if not rows:
        return ""
    models, deltas = _ordered_keys(rows, "models"), _ordered_keys(rows, "deltas")
    head = "".join(f"<th>{_e(k)}</th>" for k in ["metric", "n", *models]) + "".join(
        f"<th>\u0394 {_e(k)}</th>" for k in deltas)
    body = []
    for row in rows:
        hib = row.get("higher_is_better")
        arrow = {True: " \u2191", False: " \u2193"}.get(hib, "")
        cells = [f"<td>{_e(row.get('metric', ''))}{arrow}</td>", f"<td>{_fmt(row.get('n', ''))}</td>"]
        cells += [_stat_cell((row.get("models") or {}).get(m)) for m in models]
        cells += [_stat_cell((row.get("deltas") or {}).get(d), hib, delta=True) for d in deltas]
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = ("<p>Cells: mean [95% CI]. \u2191/\u2193: higher/lower is better. "
            "\u25b2/\u25bc: the difference's interval excludes 0 in the better/worse direction.</p>")
    return f"<h2>Results</h2><table><tr>{head}</tr>{''.join(body)}</table>{note}"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def render_chart(metric: str, runs: dict[str, list[dict]], colors: dict[str, str],
                 width: int = 320, height: int = 170) -> str:
    """One SVG line chart: a polyline per run that logged ``metric``, min/max axis labels, a legend."""
    series = {}
    for run, logs in runs.items():
        pts = [(r.get("step", i), r[metric]) for i, r in enumerate(logs or [])
               if isinstance(r, dict) and _finite(r.get(metric)) and _finite(r.get("step", i))]
        if pts:
            series[run] = pts
    if not series:
        return ""
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)  # flat: give the axis a span
    left, right, top, bottom = 46, 8, 20, 34
    pw, ph = width - left - right, height - top - bottom

    def xy(x, y):
        return f"{left + (x - x0) / (x1 - x0) * pw:.1f},{top + (y1 - y) / (y1 - y0) * ph:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="{_e(metric)}" font-size="10" font-family="sans-serif">',
             f'<text x="{left}" y="13" font-size="12" font-weight="600">{_e(metric)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
             f'<text x="{left - 3}" y="{top + 8}" text-anchor="end">{_fmt(y1)}</text>',
             f'<text x="{left - 3}" y="{top + ph}" text-anchor="end">{_fmt(y0)}</text>',
             f'<text x="{left}" y="{top + ph + 12}">{_fmt(x0)}</text>',
             f'<text x="{left + pw}" y="{top + ph + 12}" text-anchor="end">{_fmt(x1)}</text>',
             f'<text x="{left + pw / 2:.0f}" y="{top + ph + 12}" text-anchor="middle">step</text>']
    for i, (run, pts) in enumerate(series.items()):
        color = colors.get(run, PALETTE[i % len(PALETTE)])
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                     f'points="{" ".join(xy(x, y) for x, y in pts)}"><title>{_e(run)}</title></polyline>')
        lx = left + i * 80
        parts.append(f'<rect x="{lx}" y="{height - 10}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{lx + 13}" y="{height - 6}">{_e(run)}</text>')
    return "".join(parts) + "</svg>"


def render_interval_chart(title: str, series: dict[str, list[dict]], xlabel: str = "",
                          width: int = 420, height: int = 220) -> str:
    """One SVG chart of points ``{x, mean, ci95}`` joined per series, each with a vertical 95% CI bar;
    a dashed line at 0 when the y range spans it (differences)."""
    pts = {name: [p for p in points or [] if isinstance(p, dict) and _finite(p.get("x")) and _finite(p.get("mean"))]
           for name, points in series.items()}
    pts = {name: p for name, p in pts.items() if p}
    if not pts:
        return ""

    def bar(p):
        ci = _ci(p)
        return ci if ci and all(_finite(v) for v in ci) else (p["mean"], p["mean"])

    xs = [p["x"] for ps in pts.values() for p in ps]
    ys = [v for ps in pts.values() for p in ps for v in (p["mean"], *bar(p))]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = (y1 - y0) * 0.05
    y0, y1 = y0 - pad, y1 + pad
    left, right, top, bottom = 52, 12, 20, 40
    pw, ph = width - left - right, height - top - bottom
    px = lambda x: left + (x - x0) / (x1 - x0) * pw
    py = lambda y: top + (y1 - y) / (y1 - y0) * ph
    per_row = max(1, (width - left) // 130)
    full_height = height + 14 * ((len(pts) - 1) // per_row)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{full_height}" '
             f'role="img" aria-label="{_e(title)}" font-size="10" font-family="sans-serif">',
             f'<text x="{left}" y="13" font-size="12" font-weight="600">{_e(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
             f'<text x="{left - 3}" y="{top + 8}" text-anchor="end">{_fmt(y1)}</text>',
             f'<text x="{left - 3}" y="{top + ph}" text-anchor="end">{_fmt(y0)}</text>',
             f'<text x="{left + pw / 2:.0f}" y="{top + ph + 24}" text-anchor="middle">{_e(xlabel)}</text>']
    if y0 < 0 < y1:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(0):.1f}" y2="{py(0):.1f}" stroke="#bbb" '
                     'stroke-dasharray="3,3"/>')
    for x in sorted(set(xs)):
        parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 12}" text-anchor="middle">{_fmt(x)}</text>')
    for i, (name, ps) in enumerate(pts.items()):
        color = PALETTE[i % len(PALETTE)]
        ps = sorted(ps, key=lambda p: p["x"])
        if len(ps) > 1:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                         + " ".join(f"{px(p['x']):.1f},{py(p['mean']):.1f}" for p in ps) + '"/>')
        for p in ps:
            lo, hi = bar(p)
            x = px(p["x"])
            parts.append(f'<g><title>{_e(name)} at {_fmt(p["x"])}: {_fmt(p["mean"])} [{_fmt(lo)}, {_fmt(hi)}]</title>'
                         f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{py(lo):.1f}" y2="{py(hi):.1f}" stroke="{color}"/>'
                         f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{py(lo):.1f}" y2="{py(lo):.1f}" stroke="{color}"/>'
                         f'<line x1="{x - 4:.1f}" x2="{x + 4:.1f}" y1="{py(hi):.1f}" y2="{py(hi):.1f}" stroke="{color}"/>'
                         f'<circle cx="{x:.1f}" cy="{py(p["mean"]):.1f}" r="3" fill="{color}"/></g>')
        row, col = divmod(i, per_row)  # the legend wraps below the chart, the page grows to hold it
        lx, ly = left + col * 130, height - 10 + row * 14
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{lx + 13}" y="{ly + 4}">{_e(name)}</text>')
    return "".join(parts) + "</svg>"


def render_interval_charts(charts) -> str:
    if not isinstance(charts, list) or not charts:
        return ""
    svgs = [render_interval_chart(str(c.get("title", "")), c.get("series") or {}, str(c.get("xlabel", "")))
            for c in charts if isinstance(c, dict)]
    svgs = [s for s in svgs if s]
    return f'<h2>Charts</h2><div class="charts">{"".join(svgs)}</div>' if svgs else ""


def render_curves(curves: dict, metrics=CURVE_METRICS) -> str:
    if not isinstance(curves, dict) or not curves:
        return ""
    colors = {run: PALETTE[i % len(PALETTE)] for i, run in enumerate(curves)}  # same colour per run everywhere
    charts = [c for c in (render_chart(m, curves, colors) for m in metrics) if c]
    return f'<h2>Training curves</h2><div class="charts">{"".join(charts)}</div>' if charts else ""


def spectrogram_image(audio_path: Path, png_path: Path, size: tuple[int, int] = SPEC_SIZE) -> bool:
    """Log-mel spectrogram of an audio file as a colour PNG (low frequencies at the bottom).

    Returns False (and writes nothing) when the file cannot be read, so the page can say so.
    """
    import soundfile as sf
    from PIL import Image

    try:
        wav, sr = sf.read(str(audio_path), dtype="float32", always_2d=True)
    except Exception as err:  # missing or undecodable: the report shows a note instead
        log.warning("no spectrogram for %s: %s", audio_path, err)
        return False
    x = wav.mean(axis=1)
    n_fft = 1 << max(8, math.ceil(math.log2(sr * 0.064)))  # ~64 ms window: 1024 at 16 kHz
    hop = n_fft // 4
    x = np.pad(x, (n_fft // 2, n_fft // 2 + max(0, n_fft - len(x))))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (time, freq)
    db = 10 * np.log10(power @ _mel_filters(sr, n_fft, 64).T + 1e-10)
    ref = max(float(db.max()), -40.0)  # the floor keeps silence dark instead of stretching noise
    level = np.clip((db - (ref - 80.0)) / 80.0, 0.0, 1.0)  # top 80 dB -> [0, 1]
    idx = np.linspace(0, len(_CMAP) - 1, 256)
    lut = np.stack([np.interp(idx, np.arange(len(_CMAP)), _CMAP[:, c]) for c in range(3)], 1)
    rgb = lut[(level.T[::-1] * 255).round().astype(int)].astype(np.uint8)  # (mel, time, 3)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").resize(size, Image.BILINEAR).save(png_path, optimize=True)
    return True


def _mel_filters(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular HTK-mel filterbank, (n_mels, n_fft // 2 + 1)."""
    mel = np.linspace(0, 2595 * np.log10(1 + sr / 2 / 700), n_mels + 2)
    hz = 700 * (10 ** (mel / 2595) - 1)
    f = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    return np.maximum(0, np.minimum((f - lo) / (mid - lo), (hi - f) / (hi - mid)))


def _media_tag(rel: str) -> str:
    src = _e(quote(rel))
    ext = Path(rel).suffix.lower()
    if ext in AUDIO_EXTENSIONS:
        return f'<audio controls preload="auto" src="{src}"></audio>'
    if ext in IMAGE_EXTENSIONS:
        return f'<img src="{src}" alt="{_e(rel)}" style="max-width:256px">'
    return f'<a href="{src}">{_e(rel)}</a>'


def render_examples(examples: list, out_dir: Path, files_dir: str = "report_files") -> str:
    """Per example: caption, seed, and per model its player, verdict and spectrogram (PNGs written here)."""
    if not examples:
        return ""
    blocks = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict):
            continue
        media, verdict = ex.get("media") or {}, ex.get("verdict") or {}
        head = f"<h3>{_e(ex.get('caption', f'example {i}'))}</h3>"
        if ex.get("seed") is not None:
            head += f"<p>seed {_e(ex['seed'])}</p>"
        figs = []
        for j, model in enumerate(dict.fromkeys([*media, *verdict])):
            parts = [f"<figcaption><b>{_e(model)}</b></figcaption>"]
            rel = media.get(model)
            if rel:
                rel = str(rel)
                parts.append(_media_tag(rel))
                if Path(rel).suffix.lower() in AUDIO_EXTENSIONS:
                    png = f"{files_dir}/ex{i:03d}_{j}_{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.png"
                    if spectrogram_image(out_dir / rel, out_dir / png):
                        parts.append(f'<img src="{_e(quote(png))}" width="{SPEC_SIZE[0]}" '
                                     f'height="{SPEC_SIZE[1]}" alt="spectrogram of {_e(model)}">')
                    else:
                        parts.append(f'<p class="missing">no spectrogram: cannot read {_e(rel)}</p>')
            if model in verdict:
                parts.append(f"<p>{_e(verdict[model])}</p>")
            figs.append(f"<figure>{''.join(parts)}</figure>")
        blocks.append(f'{head}<div class="models">{"".join(figs)}</div>')
    return "<h2>Examples</h2>" + "".join(blocks)


def render_html(results: dict, out_dir: Path, files_dir: str = "report_files") -> str:
    title = _e(results.get("title") or "Report")
    sections = [f"<h1>{title}</h1>"]
    if results.get("summary"):
        sections += [f"<p>{_e(p.strip())}</p>" for p in str(results["summary"]).split("\n\n") if p.strip()]
    sections += [render_table(results.get("table") or []),
                 render_interval_charts(results.get("interval_charts") or []),
                 render_curves(results.get("curves") or {}),
                 render_examples(results.get("examples") or [], out_dir, files_dir)]
    if results.get("settings"):
        text = json.dumps(results["settings"], indent=2, default=str, ensure_ascii=False)
        sections.append(f"<details><summary>Settings</summary><pre>{_e(text)}</pre></details>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head>\n'
            f'<body>\n{chr(10).join(s for s in sections if s)}\n</body></html>\n')


def write_report(results: dict, out_dir: Path, name: str = "report") -> Path:
    """Write ``out_dir/<name>.html`` (spectrograms under ``out_dir/<name>_files/``); return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.html"
    path.write_text(render_html(results, out_dir, f"{name}_files"), encoding="utf-8")
    return path
