"""The pipeline report: one self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched)
and the same summary as JSON.

The page answers, top to bottom: what to deploy and why, how every candidate measured and which
constraint it broke, where the candidates sit against size and latency, and the machine it was
measured on. Every piece of text from the summary goes through `html.escape`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tailor_gateway.report_svg import Point, loss_plot, scatter
from tailor_gateway.report_text import esc, is_num, num
from tailor_runtime import metrics_catalogue as mc
from tailor_runtime.benchmark_report import Environment

# metric -> (label, unit), from the one catalogue; the unit goes in column headers and axis titles.
METRICS = {
    name: (mc.label(name), mc.unit(name))
    for name in (
        "perplexity",
        "perplexity_increase_pct",
        "size_mb",
        "latency_ms_per_token",
        "tokens_per_s",
        "peak_memory_mb",
        "model_memory_mb",
        "top1_agreement",
        "kl_divergence",
    )
}
_OPS = {"at_most": "≤", "at_least": "≥"}


def render_report_json(summary: dict[str, Any]) -> str:
    # NaN and infinity are not JSON: a failed measurement becomes null.
    return json.dumps(_finite(summary), indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def render_report_html(summary: dict[str, Any]) -> str:
    pipeline = summary.get("pipeline", {})
    title = f"Tailor report: {pipeline.get('name') or pipeline.get('id') or 'pipeline'}"
    plots = _plots(summary)
    body = "\n".join(
        [
            f"<header><h1>{esc(title)}</h1><p class=muted>pipeline {esc(pipeline.get('id', ''))} · "
            f"created {esc(pipeline.get('created', ''))}</p></header>",
            _recommendation(summary),
            _goals(summary),
            _table(summary),
            f"<section><h2>Quality against cost</h2><div class=plots>{plots}</div>{_LEGEND}"
            "<p class=muted>Lower is better on both axes. The line joins each plot's Pareto front: the "
            "candidates no other candidate beats on both of its axes. The table's Pareto badge is the "
            "selector's verdict over all the objectives.</p></section>",
            _export(summary),
            _finetune(summary),
            _footer(summary),
        ]
    )
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        # No fetch of any kind is allowed: the page must open the same offline and in ten years.
        "<meta http-equiv=Content-Security-Policy content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>{esc(title)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


# --- page sections ------------------------------------------------------------------------------
def _recommendation(summary: dict) -> str:
    rationale = f"<p>{esc(summary.get('rationale', ''))}</p>" if summary.get("rationale") else ""
    chosen = _candidate(summary, summary.get("recommended", ""))
    if chosen is None:
        return (
            "<section class='verdict none'><h2>No candidate is recommended</h2>"
            f"<p>None of the candidates meets every constraint.</p>{rationale}</section>"
        )
    base = _candidate(summary, summary.get("baseline", "")) or {}
    facts = []
    for metric in ("size_mb", "latency_ms_per_token"):
        # "1.28x slower", never "0.78x faster": the ratio is >= 1 and the word says which way.
        words = mc.ratio_text(metric, _metric(chosen, metric), _metric(base, metric))
        if words and chosen is not base:
            facts.append(words)
    ppl = _ppl_change(chosen, base)
    if ppl is not None and chosen is not base:
        facts.append(f"perplexity {_signed_pct(ppl)}")
    facts_html = "".join(f"<span class=chip>{esc(f)}</span>" for f in facts)
    versus = f" than {esc(base.get('name', ''))}" if facts and base else ""
    return (
        "<section class='verdict ok'><p class=eyebrow>Recommended</p>"
        f"<h2>{esc(chosen['name'])} <span class=muted>({esc(chosen.get('method', ''))})</span></h2>"
        f"<p>{facts_html}{versus}</p>{rationale}</section>"
    )


def _goals(summary: dict) -> str:
    items = [f"<li>{esc(_constraint_text(c))}</li>" for c in summary.get("constraints", [])]
    objectives = [
        f"<li>{'maximize' if o.get('maximize') else 'minimize'} {esc(_label(o.get('metric', '')))}"
        f"{esc(' (weight ' + _short(o['weight']) + ')') if o.get('weight', 1.0) != 1.0 else ''}</li>"
        for o in summary.get("objectives", [])
    ]
    return (
        "<section class=goals><div><h3>Constraints</h3>"
        f"<ul>{''.join(items) or '<li>none</li>'}</ul></div><div><h3>Objectives</h3>"
        f"<ul>{''.join(objectives) or '<li>none</li>'}</ul></div></section>"
    )


def _table(summary: dict) -> str:
    base = _candidate(summary, summary.get("baseline", "")) or {}
    candidates = summary.get("candidates", [])
    memory = mc.memory_label_for({c.get("device") for c in candidates})
    header = (
        "<tr><th>Candidate</th><th>Method</th><th class=n>Size (MB)</th><th class=n>Perplexity (Δ)</th>"
        f"{_th('latency_ms_per_token')}{_th('tokens_per_s')}"
        f"<th class=n>{esc(memory)}<br>(MB)</th>"
        "<th class=n title='with the model it was quantized from'>Top-1 agreement<br>(KL, nats)</th>"
        "<th>Verdict</th></tr>"
    )
    rows = []
    for cand in summary.get("candidates", []):
        classes = [
            "rec" if cand.get("name") == summary.get("recommended") else "",
            "" if cand.get("feasible") else "fail",
        ]
        size, base_size = _metric(cand, "size_mb"), _metric(base, "size_mb")
        size_note = (
            f" <small>({_signed_pct((size / base_size - 1) * 100)})</small>"
            if size and base_size and cand is not base
            else ""
        )
        badges = "".join(
            [
                " <span class='badge rec'>recommended</span>" if "rec" in classes else "",
                " <span class='badge pareto' title='Pareto-optimal over all the objectives'>Pareto</span>"
                if cand.get("pareto_optimal")
                else "",
                " <span class='badge base'>baseline</span>" if cand is base else "",
            ]
        )
        artifact = cand.get("artifact_id", "")
        rows.append(
            f"<tr class='{' '.join(c for c in classes if c)}'>"
            f"<td><b>{esc(cand.get('name', ''))}</b>{badges}</td>"
            f"<td>{esc(cand.get('method', ''))}<br><code title='artifact {esc(artifact)}'>{esc(artifact[:12])}</code></td>"
            f"<td class=n>{num(size)}{size_note}</td><td class=n>{num(_metric(cand, 'perplexity'), 3)}"
            f" <small>({_signed_pct(_ppl_change(cand, base))})</small>{_gate_note(cand, base)}</td>"
            f"<td class=n>{num(_metric(cand, 'latency_ms_per_token'))}</td>"
            f"<td class=n>{num(_metric(cand, 'tokens_per_s'))}</td>"
            f"<td class=n>{num(_metric(cand, 'peak_memory_mb'))}{_device_note(cand, candidates)}</td>"
            f"<td class=n>{_agreement(cand)}</td>"
            f"<td>{_verdict(cand, summary)}</td></tr>"
        )
    reference = summary.get("base_model")
    if reference:  # the model before fine-tuning, measured on the same tokens: a reference, not a candidate
        rows.append(
            "<tr class='reference'>"
            f"<td><b>base</b> <span class='badge base'>before fine-tuning</span></td>"
            f"<td>{esc(reference.get('method', ''))}<br><code>{esc(reference.get('artifact_id', '')[:12])}</code></td>"
            f"<td class=n>{num(_metric(reference, 'size_mb'))}</td>"
            f"<td class=n>{num(_metric(reference, 'perplexity'), 3)}"
            f" <small>({_signed_pct(_metric(reference, 'perplexity_increase_pct'))})</small></td>"
            f"<td class=n>{num(_metric(reference, 'latency_ms_per_token'))}</td>"
            f"<td class=n>{num(_metric(reference, 'tokens_per_s'))}</td>"
            f"<td class=n>{num(_metric(reference, 'peak_memory_mb'))}</td>"
            "<td class=n>-</td><td>reference row: what fine-tuning changed (not selectable)</td></tr>"
        )
    return (
        "<section><h2>Candidates</h2><div class=scroll><table>"
        f"<thead>{header}</thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _th(metric: str) -> str:
    """A numeric column header: the catalogue's label (with its aggregation), then the unit, and the
    catalogue's account of the aggregation as the tooltip."""
    entry = mc.lookup(metric)
    tip = f" title='{esc(entry.aggregation)}'" if entry else ""
    return f"<th class=n{tip}>{esc(mc.label(metric))}<br>({esc(mc.unit(metric))})</th>"


def _device_note(cand: dict, candidates: list[dict]) -> str:
    """Where the column mixes GPU allocator peaks and RSS, each row says which it is."""
    devices = {c.get("device") for c in candidates if c.get("device")}
    if len(devices) < 2 or not cand.get("device"):
        return ""
    return f" <small>({'GPU' if cand['device'] == 'cuda' else 'RSS'})</small>"


def _gate_note(cand: dict, base: dict) -> str:
    """A gate-rejected candidate's increase is the gate's, against the gate's own measurement of the
    parent; say so, with that baseline and its tokens, whenever it is not the table's baseline."""
    gate = cand.get("gate") or {}
    parent = gate.get("parent_perplexity")
    if not is_num(parent):
        return ""
    tokens = gate.get("tokens_scored")
    on = f" on {int(tokens):,} tokens" if is_num(tokens) else ""
    theirs = _metric(base, "perplexity")
    if theirs is not None and abs(parent / theirs - 1) < 1e-3:
        return f"<br><small>gate, same tokens as the benchmark{esc(on)}</small>"
    return f"<br><small>{esc(f'gate: vs its parent {num(parent, 3)}{on}, not the baseline row')}</small>"


def _agreement(cand: dict) -> str:
    top1 = _metric(cand, "top1_agreement")
    if top1 is None:
        return "—"
    kl = _metric(cand, "kl_divergence")
    return f"{top1:.3f}" + (f" <small>({kl:.4f})</small>" if kl is not None else "")


def _verdict(cand: dict, summary: dict) -> str:
    if cand.get("feasible"):
        return "<span class='pass nw'>✓ meets every constraint</span>"
    violations = cand.get("violations") or []
    if not violations:
        return "<span class=bad>✗ not feasible</span>"
    comparisons = {c.get("metric"): c.get("comparison") for c in summary.get("constraints", [])}
    lines = []
    for v in violations:
        metric, limit, actual = v.get("metric", ""), v.get("limit"), v.get("actual")
        op = "<" if comparisons.get(metric) == "at_least" else ">"
        unit = _unit(METRICS.get(metric, ("", ""))[1])
        # A relative excess reads at a glance; a percentage metric already is one.
        over = ""
        if unit != "%" and is_num(limit) and is_num(actual) and limit:
            over = f" ({_signed_pct((actual - limit) / abs(limit) * 100)})"
        text = f"✗ {_label(metric)} {num(actual)}{unit} {op} {_short(limit)}{unit}{over}"
        lines.append(f"<span class=nw>{esc(text)}</span>")
    if cand.get("rejected_by"):
        lines.insert(0, f"<span class=nw>{esc('✗ ' + cand['rejected_by'] + ': not published')}</span>")
    return "<span class=bad>" + "".join(lines) + "</span>"


def _export(summary: dict) -> str:
    export = summary.get("export")
    if not export:
        return ""
    facts = [("format", export.get("format", "")), ("artifact", export.get("artifact_id", ""))]
    if is_num(export.get("max_abs_diff")):
        bound = f" (allowed ≤ {export['atol']:g})" if is_num(export.get("atol")) else ""
        facts.append(("largest |difference| from the source model", f"{export['max_abs_diff']:.2g}{bound}"))
    known = {"format", "artifact_id", "max_abs_diff", "atol"}
    for key, label, floor_key in EXPORT_AGREEMENTS:
        if is_num(export.get(key)):
            floor = export.get(floor_key) if floor_key else _NO_FLOOR
            facts.append((label, _agreement_text(export[key], floor)))
        known |= {key, floor_key or key}
    facts += [(k, v) for k, v in export.items() if k not in known]
    return _facts_section("Export", facts)


# Each export check's agreement with its source, and the key of the floor it had to reach.
EXPORT_AGREEMENTS = (
    ("top1_agreement", "top-1 token agreement", "min_top1_agreement"),
    ("llama_cpp_top1_agreement", "top-1 token agreement in llama.cpp", "llama_cpp_min_top1_agreement"),
    ("llama_cpp_greedy_agreement", "greedy tokens equal to the source's", "llama_cpp_min_greedy_agreement"),
    ("greedy_agreement", "runner's greedy tokens equal to the source's", "min_greedy_agreement"),
    # Informational (the dense model decoded from the candidate, before the export): no floor applies.
    ("decode_top1_agreement", "top-1 agreement of the decoded source", None),
)


_NO_FLOOR = object()


def _agreement_text(value: float, floor: Any) -> str:
    """ "27.0% (floor 25%: passed)": an agreement always beside the floor it was checked against."""
    text = f"{100 * value:.1f}%"
    if floor is _NO_FLOOR:
        return text
    if not is_num(floor):
        return text + " (no floor reported)"
    verdict = "passed" if value >= floor else "BELOW the floor"
    return text + f" (floor {100 * floor:g}%: {verdict})"


def _finetune(summary: dict) -> str:
    finetune = summary.get("finetune")
    if not finetune:
        return ""
    facts = [(k, v) for k, v in finetune.items() if k not in ("loss_curve", "eval_losses")]
    section = _facts_section("Fine-tuning", facts)
    curve = [p for p in finetune.get("loss_curve", []) if is_num(p[1])]
    if len(curve) < 2:
        return section
    evals = [(e["step"], e["loss"]) for e in finetune.get("eval_losses", []) if is_num(e.get("loss"))]
    caption = "The line is the training loss at each step" + (
        "; the green points are the loss on held-out text (eval_every)." if evals else "."
    )
    plot = f"<div class=plots style='max-width:640px'>{loss_plot(curve, evals)}</div><p class=muted>{caption}</p>"
    return section.replace("</section>", f"{plot}</section>")


def _footer(summary: dict) -> str:
    """The machine, from the environment block the benchmarker writes (`tailor_runtime.benchmark_report`)."""
    env = Environment.parse(summary.get("environment"), "the summary's environment")
    gpu = env.gpu
    where = [env.hostname]
    if gpu is not None:
        memory = f", {gpu.memory_total_mb / 1024:.0f} GiB" if is_num(gpu.memory_total_mb) else ""
        where.append(f"{gpu.name or 'a CUDA GPU'}{memory}")
    if env.cpu_model:
        cores = env.cores()
        where.append(env.cpu_model + (f", {cores} cores" if cores else ""))
    if is_num(env.memory_total_mb):
        where.append(f"{env.memory_total_mb / 1024:.0f} GiB RAM")
    machine = " · ".join(w for w in where if w) or "a machine the benchmark did not describe"
    threads = env.threads.torch_intra_op
    software = [f"{threads} torch thread(s)"] if threads is not None else []
    if gpu is not None and gpu.cuda:
        software.append(f"CUDA {gpu.cuda}")
    software += [f"{k} {v}" for k, v in sorted(env.versions.items()) if v]
    software += [f"Python {env.python}"] if env.python else []
    software += [env.platform] if env.platform else []
    rest = " · ".join(esc(s) for s in software)
    return (
        f"<footer>All numbers were measured on <b>{esc(machine)}</b>"
        f"{' · ' + rest if rest else ''}. Generated by Tailor.</footer>"
    )


def _facts_section(title: str, facts: list[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{esc(str(k))}</dt><dd>{esc(_scalar(v))}</dd>" for k, v in facts)
    return f"<section><h2>{esc(title)}</h2><dl>{rows}</dl></section>"


# --- plots --------------------------------------------------------------------------------------
def _plots(summary: dict) -> str:
    base = _candidate(summary, summary.get("baseline", "")) or {}
    limits = {
        c.get("metric"): c.get("value") for c in summary.get("constraints", []) if is_num(c.get("value"))
    }
    hlines = []
    base_ppl = _metric(base, "perplexity")
    if base_ppl and "perplexity_increase_pct" in limits:
        pct = limits["perplexity_increase_pct"]
        hlines.append((base_ppl * (1 + pct / 100), f"limit: perplexity +{_short(pct)}%"))
    out = []
    for metric in ("size_mb", "latency_ms_per_token"):
        label, unit = METRICS[metric]
        points = []
        for cand in summary.get("candidates", []):
            x, y = _metric(cand, metric), _metric(cand, "perplexity")
            if x is None or y is None:
                continue  # a failed measurement cannot be placed; the table shows it
            name = str(cand.get("name", ""))
            tip = (
                f"{name} ({cand.get('method', '')}): {label.lower()} {num(x)} {unit}, perplexity {num(y, 3)}"
            )
            recommended = name == summary.get("recommended")
            points.append(Point(name, x, y, bool(cand.get("feasible")), recommended, tip))
        vlines = [(limits[metric], f"limit: {label.lower()}")] if metric in limits else []
        plot_id = "plot-" + metric.split("_")[0]
        title = f"Perplexity against {label.lower()}"
        out.append(scatter(plot_id, title, points, f"{label} ({unit})", hlines, vlines))
    return "".join(out)


# --- values -------------------------------------------------------------------------------------
def _candidate(summary: dict, name: str) -> dict | None:
    return next((c for c in summary.get("candidates", []) if c.get("name") == name), None)


def _metric(cand: dict, metric: str) -> float | None:
    value = (cand.get("metrics") or {}).get(metric)
    return float(value) if is_num(value) else None


def _ppl_change(cand: dict, base: dict) -> float | None:
    given = _metric(cand, "perplexity_increase_pct")
    if given is not None:
        return given
    ours, theirs = _metric(cand, "perplexity"), _metric(base, "perplexity")
    return (ours / theirs - 1) * 100 if ours is not None and theirs else None


def _constraint_text(c: dict) -> str:
    metric = c.get("metric", "")
    unit = METRICS.get(metric, ("", ""))[1]
    op = _OPS.get(c.get("comparison", ""), c.get("comparison", ""))
    return f"{_label(metric)} {op} {_short(c.get('value'))}{_unit(unit)}"


def _label(metric: str) -> str:
    return METRICS.get(metric, (metric.replace("_", " "), ""))[0]


def _unit(unit: str) -> str:
    return "%" if unit == "%" else f" {unit}" if unit else ""


def _short(value: Any) -> str:
    """A limit as a person wrote it: 5, not 5.00; 1,024, not 1,024.0."""
    if not is_num(value):
        return "—"
    return f"{value:,.3f}".rstrip("0").rstrip(".")


def _signed_pct(value: float | None) -> str:
    if value is None:
        return "—"
    digits = 2 if 0 < abs(value) < 0.1 else 1
    return f"{'+' if value > 0 else '−' if value < 0 else '±'}{num(abs(value), digits)}%"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return num(value, 4)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


_LEGEND = (
    "<p class=legend>"
    "<span><svg width=16 height=16><circle cx=8 cy=8 r=6 class='pt pareto'/></svg>on the plot's Pareto front"
    "<svg width=30 height=16><line x1=2 x2=28 y1=8 y2=8 class=front /></svg></span>"
    "<span><svg width=16 height=16><circle cx=8 cy=8 r=6 class='pt ok'/></svg>meets the constraints</span>"
    "<span><svg width=16 height=16><circle cx=8 cy=8 r=6 class='pt fail'/></svg>breaks a constraint</span>"
    "<span><svg width=26 height=26><circle cx=13 cy=13 r=11 class=ring /><circle cx=13 cy=13 r=6 class='pt rec'/>"
    "</svg>recommended</span>"
    "<span><svg width=30 height=16><line x1=2 x2=28 y1=8 y2=8 class=limit /></svg>constraint limit</span>"
    "</p>"
)

_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--blue:#2563eb;--blue2:#93c5fd;--grey:#9ca3af;
--green:#15803d;--red:#dc2626;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink)}
body{max-width:1200px;margin:0 auto;padding:24px;line-height:1.45;background:#fff}
h1{font-size:26px;margin:0 0 4px}h2{font-size:19px;margin:0 0 10px}h3{font-size:14px;margin:0 0 4px}
section{margin:22px 0}.muted{color:var(--muted);font-weight:normal}
.verdict{border-radius:10px;padding:16px 20px}.verdict.ok{background:#f0fdf4;border:1px solid #bbf7d0}
.verdict.none{background:#fef2f2;border:1px solid #fecaca}.verdict h2{font-size:22px}
.eyebrow{text-transform:uppercase;letter-spacing:.08em;font-size:12px;color:var(--green);margin:0 0 4px;font-weight:600}
.chip{display:inline-block;background:#fff;border:1px solid #bbf7d0;border-radius:999px;padding:1px 10px;margin-right:6px;font-weight:600}
.goals{display:flex;gap:48px}.goals ul{margin:0;padding-left:18px}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:13.5px}
th,td{padding:7px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600;white-space:nowrap}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.rec td{background:#f0fdf4}tr.fail td{color:var(--muted)}tr.fail td b{color:var(--ink)}
.nw{white-space:nowrap;display:block}.pass{color:var(--green)}.bad{color:var(--red)}small{color:var(--muted)}
.badge{font-size:11px;border-radius:4px;padding:1px 5px;margin-left:4px;white-space:nowrap}
.badge.rec{background:var(--green);color:#fff}.badge.pareto{background:#dbeafe;color:#1e40af}.badge.base{background:#f3f4f6;color:#374151}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:16px}
svg.plot{width:100%;height:auto;border:1px solid var(--line);border-radius:8px;background:#fff}
.ptitle{font-size:15px;font-weight:600;text-anchor:middle;fill:var(--ink)}
.atitle{font-size:13px;text-anchor:middle;fill:var(--ink)}.tick{font-size:11px;fill:var(--muted);text-anchor:middle}
.grid{stroke:#f1f5f9}.frame{fill:none;stroke:#cbd5e1}
.limit{stroke:var(--red);stroke-width:1.5;stroke-dasharray:6 4}.limtext{font-size:11px;fill:var(--red)}
.front{fill:none;stroke:var(--blue);stroke-width:2;stroke-opacity:.55}
.pt{stroke:#fff;stroke-width:1.5}.pt.pareto{fill:var(--blue)}.pt.ok{fill:var(--blue2)}.pt.rec{fill:var(--green)}
.pt.fail{fill:#d1d5db;stroke:var(--grey)}.ring{fill:none;stroke:var(--green);stroke-width:2.5}
.plabel,.limtext{paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
.plabel{font-size:12px;fill:var(--ink)}.plabel.fail{fill:var(--grey)}.plabel.rec{fill:var(--green);font-weight:700}
.start{text-anchor:start}.end{text-anchor:end}.middle{text-anchor:middle}
.legend{font-size:13px;color:var(--muted);display:flex;flex-wrap:wrap;gap:6px 18px;align-items:center}
.legend span{display:inline-flex;align-items:center;gap:5px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px;margin:0}dt{color:var(--muted)}dd{margin:0}
code{font-size:11.5px;color:var(--muted)}footer{margin-top:32px;padding-top:12px;border-top:1px solid var(--line);font-size:13px;color:var(--muted)}
footer b{color:var(--ink)}
"""
