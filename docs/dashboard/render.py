#!/usr/bin/env python3
"""Renders the panels of grafana/dashboards/booking.json from a Prometheus to one PNG.

Each panel's queries are sent as they are to Prometheus's HTTP API (`$__rate_interval` and
`$__range` replaced the way Grafana would), and drawn where the dashboard places the panel. It is
not Grafana, but it is the dashboard's own queries over real data. Needs matplotlib.

    python3 docs/dashboard/render.py --prometheus http://127.0.0.1:9090 --minutes 15 --out docs/dashboard.png
"""
import argparse
import json
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def query(prom, path, **params):
    url = f"{prom}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def legend(fmt, metric):
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt or "") or json.dumps(metric)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--dashboard", default=str(ROOT / "grafana/dashboards/booking.json"))
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--end", type=float, help="unix time of the right edge (default now)")
    p.add_argument("--rate-interval", default="20s", help="what $__rate_interval stands for")
    p.add_argument("--step", type=float, default=5)
    p.add_argument("--out", default=str(ROOT / "docs/dashboard.png"))
    args = p.parse_args()

    dash = json.load(open(args.dashboard))
    end = args.end or time.time()
    start = end - args.minutes * 60
    rng = f"{int(args.minutes * 60)}s"
    bottom = max(pn["gridPos"]["y"] + pn["gridPos"]["h"] for pn in dash["panels"])
    unit_h = 0.42  # inches per grid row
    fig = plt.figure(figsize=(22, bottom * unit_h))
    fig.suptitle(f'{dash["title"]} — last {args.minutes:g} min (rendered from Prometheus by docs/dashboard/render.py)', fontsize=13, y=0.999)

    def rect(g, pad=0.35):
        x0, w = g["x"] / 24, g["w"] / 24
        y0 = 1 - (g["y"] + g["h"]) / bottom
        h = g["h"] / bottom
        return [x0 + 0.035 * w + 0.004, y0 + pad / bottom, w - 0.05 * w - 0.004, h - (pad + 0.9) / bottom]

    for pn in dash["panels"]:
        g = pn["gridPos"]
        if pn["type"] == "row":
            fig.text(0.005, 1 - (g["y"] + 0.8) / bottom, pn["title"], fontsize=12, weight="bold", color="#1f60c4")
            continue
        ax = fig.add_axes(rect(g))
        ax.set_title(pn["title"], fontsize=9, loc="left")
        unit = pn.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if pn["type"] == "stat":
            ax.axis("off")
            texts = []
            for t in pn["targets"]:
                expr = t["expr"].replace("$__range", rng).replace("$__rate_interval", args.rate_interval)
                for r in query(args.prometheus, "query", query=expr, time=end):
                    v = float(r["value"][1])
                    mappings = pn.get("fieldConfig", {}).get("defaults", {}).get("mappings", [])
                    shown = next((m["options"][str(int(v))]["text"] for m in mappings if str(int(v)) in m.get("options", {})), None)
                    label = legend(t.get("legendFormat"), r["metric"])
                    texts.append((label, shown or f"{v:,.0f}"))
            if not texts:
                ax.text(0.5, 0.4, pn.get("fieldConfig", {}).get("defaults", {}).get("noValue", "No data"), ha="center", fontsize=12, color="gray")
            elif len(texts) == 1:
                ax.text(0.5, 0.3, texts[0][1], ha="center", fontsize=26, weight="bold", color="#37872d")
            else:
                for i, (label, shown) in enumerate(sorted(texts)):
                    col, rowi = i % 6, i // 6
                    ax.text(col / 6 + 0.01, 0.75 - rowi * 0.3, f"{label}\n{shown}", fontsize=7,
                            color="#37872d" if shown in ("UP",) or shown.replace(",", "").isdigit() else "#c4162a")
            continue
        lines = 0
        for t in pn["targets"]:
            expr = t["expr"].replace("$__rate_interval", args.rate_interval).replace("$__range", rng)
            series = query(args.prometheus, "query_range", query=expr, start=start, end=end, step=args.step)
            for s in series:
                xs = [(float(ts) - end) / 60 for ts, _ in s["values"]]
                ys = [float(v) for _, v in s["values"]]
                ax.plot(xs, ys, linewidth=1, label=legend(t.get("legendFormat"), s["metric"]))
                lines += 1
        if not lines:
            ax.text(0.5, 0.5, pn.get("fieldConfig", {}).get("defaults", {}).get("noValue", "No data"), ha="center", va="center",
                    transform=ax.transAxes, color="gray")
        else:
            handles, labels = ax.get_legend_handles_labels()
            peak = [max([y for y in h.get_ydata() if y == y] or [0]) for h in handles]  # y == y skips NaN
            keep = sorted(range(len(labels)), key=lambda i: -peak[i])[:8]
            ax.legend([handles[i] for i in keep], [labels[i] for i in keep], fontsize=5.5, loc="upper left", framealpha=0.6,
                      title=f"+{len(labels) - 8} more" if len(labels) > 8 else None, title_fontsize=5.5)
        ax.set_xlim(-args.minutes, 0)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("minutes", fontsize=6, labelpad=1)
        ax.grid(alpha=0.3)
        if unit == "s":
            ax.yaxis.set_major_formatter(EngFormatter(unit="s"))
        elif unit in ("reqps", "ops"):
            ax.set_ylabel("/s", fontsize=6)
    fig.savefig(args.out, dpi=72)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
