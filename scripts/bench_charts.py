#!/usr/bin/env python3
"""Charts of a bench report (issue 7).

Usage: scripts/bench_charts.py docs/bench/latest.json [OUTPUT_DIR]

Writes, into OUTPUT_DIR (default: the JSON file's folder):
  expiry-lateness.png  expiry lateness before vs after (histogram on log-spaced bins, and CDF)
  latencies.png        latency histograms of every other measure, with p50 and p99 marked
The samples are those kept in the JSON (all of them, or 2,000 evenly spaced ranks).
"""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def log_bins(values, n=60):
    lo = max(min(v for v in values if v > 0) if any(v > 0 for v in values) else 0.01, 0.01)
    hi = max(max(values), lo * 10)
    return [lo * (hi / lo) ** (i / n) for i in range(n + 1)]


def expiry_chart(report, out):
    expiry = report["results"].get("expiry", {})
    series = [(label, e["lateness"]) for label, e in sorted(expiry.items()) if e.get("lateness", {}).get("samples_ms")]
    if not series:
        return False
    colors = {"after": "tab:green", "before": "tab:red"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    everything = [max(v, 0.01) for _, s in series for v in s["samples_ms"]]
    bins = log_bins(everything)
    for label, s in series:
        vals = [max(v, 0.01) for v in s["samples_ms"]]
        # Samples are a quantile sketch: weight each so the bars show the share of all holds.
        w = [100.0 / len(vals)] * len(vals)
        c = colors.get(label)
        ax1.hist(vals, bins=bins, weights=w, alpha=0.6, color=c,
                 label=f"{label}: p50 {s['p50_ms']:.0f} / p99 {s['p99_ms']:.0f} / max {s['max_ms']:.0f} ms (n={s['count']})")
        ys = [(i + 1) / len(vals) for i in range(len(vals))]
        ax2.step(sorted(vals), ys, where="post", color=c, label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("lateness: expired_at − expires_at (ms, log scale)")
        ax.axvline(100, color="gray", linestyle="--", linewidth=1)
        ax.axvline(10000, color="gray", linestyle=":", linewidth=1)
        ax.grid(True, which="both", alpha=0.2)
    ax1.text(100, ax1.get_ylim()[1] * 0.95, " ±100 ms (doc, after)", color="gray", fontsize=8, va="top")
    ax1.text(10000, ax1.get_ylim()[1] * 0.95, " 10 s (doc, before)", color="gray", fontsize=8, va="top", ha="right")
    ax1.set_ylabel("% of holds")
    ax1.set_title("Expiry lateness: delay-scheduler (after) vs 10 s scan (before)")
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, 0.88))
    ax2.set_ylabel("share of holds expired")
    ax2.set_title("Cumulative distribution")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "expiry-lateness.png"), dpi=110)
    plt.close(fig)
    return True


def latency_series(r):
    out = []
    q = r.get("queue_spike")
    if q:
        out.append(("queue entry", q["entry_latency"]))
        out.append(("queue position query", q["position_latency"]))
        out.append(("notification: outbox row → stored", q["notifications"]["outbox_to_stored"]))
    f = r.get("seat_fight")
    if f:
        out.append((f"seat fight ({f['fighters']} on one seat)", f["latency"]))
    s = r.get("sell_out")
    if s:
        out.append(("sell-out: every hold attempt", s["latency"]))
    p = r.get("payments")
    if p:
        out.append(("payment", p["latency"]))
    e = r.get("end_to_end")
    if e:
        out.append(("payment answer → SSE event", e["payment_to_stream"]))
        out.append(("expiresAt → SSE event", e["expiry_to_stream"]))
    return [(name, s) for name, s in out if s.get("samples_ms")]


def latency_chart(report, out):
    series = latency_series(report["results"])
    if not series:
        return False
    cols = 3
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, s) in zip([a for row in axes for a in row], series):
        vals = s["samples_ms"]
        w = [100.0 / len(vals)] * len(vals)
        ax.hist(vals, bins=50, weights=w, color="tab:blue", alpha=0.75)
        for q, style in (("p50_ms", "--"), ("p99_ms", ":")):
            ax.axvline(s[q], color="black", linestyle=style, linewidth=1)
        ax.set_title(f"{name}\np50 {s['p50_ms']:.1f} / p99 {s['p99_ms']:.1f} / max {s['max_ms']:.1f} ms (n={s['count']})", fontsize=9)
        ax.set_xlabel("ms")
        ax.set_ylabel("% of requests")
        ax.grid(True, alpha=0.2)
    for ax in [a for row in axes for a in row][len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latencies.png"), dpi=100)
    plt.close(fig)
    return True


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(path) or "."
    os.makedirs(out, exist_ok=True)
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    made = []
    if expiry_chart(report, out):
        made.append("expiry-lateness.png")
    if latency_chart(report, out):
        made.append("latencies.png")
    print(f"charts in {out}: {', '.join(made) or 'none (no samples)'}", file=sys.stderr)


if __name__ == "__main__":
    main()
