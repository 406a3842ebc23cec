"""The review page's HTML (`seg review`): inline CSS and script, no network, every text escaped.

The cases are `<li class="case">` items with their sort keys in data attributes. The page sorts them by the URL's
`#sort=dice` (worst mean Dice first), `-dice` (best first), `flags` (most flags first) or `case` (by id); the
default is `dice` for a run and `flags` for a `seg predict` output. Keys: j / k or the down / up arrows go to the
next / previous case, h / l or the left / right arrows to its previous / next epoch. Once loaded, the body's
`data-images` and `data-images-loaded` (images with a `naturalWidth`) say whether every image could be shown.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

from seg.explain.export import _fmt

CSS = """
:root { color-scheme: light dark; --muted: #777; --line: #8884; --accent: #1f77b4; --bad: #c0392b; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; max-width: 1600px; padding: 0 16px 40px; }
header { position: sticky; top: 0; background: Canvas; padding: 8px 0; border-bottom: 1px solid var(--line);
         z-index: 1; display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; }
h1 { font-size: 18px; margin: 0; } h2 { font-size: 16px; margin: 20px 0 8px; } h3 { font-size: 15px; margin: 0; }
.muted, .keys { color: var(--muted); } .keys kbd { border: 1px solid var(--line); border-radius: 3px; padding: 0 3px; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid var(--line);
        text-align: left; vertical-align: top; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { overflow: auto; max-height: 400px; padding: 8px; border: 1px solid var(--line); }
ol#cases { list-style: none; padding: 0; margin: 0; }
li.case { border: 1px solid var(--line); border-radius: 6px; padding: 10px; margin: 12px 0; scroll-margin-top: 60px; }
li.case.current { border-color: var(--accent); box-shadow: 0 0 0 2px var(--accent); }
.head { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; margin-bottom: 6px; }
.badge { border-radius: 10px; padding: 0 8px; background: var(--bad); color: #fff; font-size: 12px; }
.epochs button { font: inherit; margin: 0 2px 4px 0; } .epochs button[aria-pressed=true] { font-weight: bold; }
img.figure, img.curves { max-width: 100%; height: auto; display: block; }
img.figure { max-width: min(100%, 1200px); margin-top: 6px; }
ul.flags { margin: 4px 0; padding-left: 18px; }
"""

SCRIPT = r"""
(function () {
  const list = document.getElementById('cases');
  const items = () => Array.from(list.children);
  const num = (li, key, missing) => { const v = li.dataset[key]; return v === '' || v === undefined ? missing : +v; };
  const byId = (a, b) => a.dataset.case < b.dataset.case ? -1 : a.dataset.case > b.dataset.case ? 1 : 0;
  const orders = {
    'dice': (a, b) => num(a, 'dice', Infinity) - num(b, 'dice', Infinity) || byId(a, b),
    '-dice': (a, b) => num(b, 'dice', -Infinity) - num(a, 'dice', -Infinity) || byId(a, b),
    'flags': (a, b) => num(b, 'flags', 0) - num(a, 'flags', 0) || byId(a, b),
    'case': byId,
  };
  const select = document.getElementById('sort');
  let current = -1;
  function sortBy(name) {
    if (!orders[name]) name = list.dataset.defaultSort;
    items().sort(orders[name]).forEach(li => list.appendChild(li));
    select.value = name;
    document.body.dataset.sort = name;
    current = -1;
  }
  const fromHash = () => (location.hash.match(/sort=([-a-z]+)/) || [])[1];
  select.addEventListener('change', () => { location.hash = 'sort=' + select.value; });
  window.addEventListener('hashchange', () => sortBy(fromHash()));
  function show(li, button) {
    li.querySelectorAll('.epochs button').forEach(b => b.setAttribute('aria-pressed', b === button));
    const img = li.querySelector('img.figure');
    img.src = button.dataset.src; img.alt = button.dataset.alt;
  }
  list.addEventListener('click', e => {
    const button = e.target.closest('.epochs button');
    if (button) show(button.closest('li.case'), button);
  });
  function go(step) {
    const all = items();
    if (!all.length) return;
    if (current >= 0) all[current].classList.remove('current');
    current = Math.max(0, Math.min(all.length - 1, current + step));
    all[current].classList.add('current');
    all[current].scrollIntoView({block: 'start'});
  }
  function epoch(step) {
    const li = items()[current];
    if (!li) return;
    const buttons = Array.from(li.querySelectorAll('.epochs button'));
    const at = buttons.findIndex(b => b.getAttribute('aria-pressed') === 'true');
    const next = buttons[Math.max(0, Math.min(buttons.length - 1, at + step))];
    if (next) show(li, next);
  }
  document.addEventListener('keydown', e => {
    if (e.altKey || e.ctrlKey || e.metaKey || e.target === select) return;
    const action = {j: () => go(1), ArrowDown: () => go(1), k: () => go(-1), ArrowUp: () => go(-1),
                    h: () => epoch(-1), ArrowLeft: () => epoch(-1), l: () => epoch(1), ArrowRight: () => epoch(1)}[e.key];
    if (action) { e.preventDefault(); action(); }
  });
  sortBy(fromHash());
  window.addEventListener('load', () => {
    const images = Array.from(document.images);
    images.forEach(img => { img.dataset.naturalWidth = img.naturalWidth; });
    document.body.dataset.images = images.length;
    document.body.dataset.imagesLoaded = images.filter(img => img.complete && img.naturalWidth > 0).length;
  });
})();
"""

# No request leaves the page: images from the page's own folder or data URIs, inline style and script only.
CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'")


def _e(value) -> str:
    return escape(str(value), quote=True)


def render(review, sources: Mapping[Path, str], curves: str | None) -> str:
    """The page of `review` (`seg.explain.review.Review`); `sources` maps each figure to its `src`, `curves` is the
    learning curves' `src` (None: none)."""
    run = review.kind == "run"
    title = f"seg review: {review.folder.resolve().name}"
    generated = datetime.datetime.now().isoformat(timespec="seconds")
    what = "training run" if run else "seg predict output"
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}</style></head>",
        "<body>",
        f"<header><h1>{_e(title)}</h1><span class=muted>{_e(what)}, {len(review.cases)} cases, {_e(generated)}</span>",
        '<label>sort <select id="sort">',
        *(f'<option value="{k}">{label}</option>' for k, label in
          (("dice", "Dice, worst first"), ("-dice", "Dice, best first"), ("flags", "flags first"), ("case", "case id"))
          if run or k in ("flags", "case")),
        "</select></label>",
        '<span class=keys><kbd>j</kbd>/<kbd>k</kbd> next/previous case, <kbd>h</kbd>/<kbd>l</kbd> epoch</span>'
        if run else '<span class=keys><kbd>j</kbd>/<kbd>k</kbd> next/previous case</span>',
        "</header>",
        f"<p class=muted>{_e(review.folder.resolve())}</p>",
    ]
    if review.notes:
        parts.append("<ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in review.notes) + "</ul>")
    if run:
        parts += _settings(review, curves)
    parts.append("<h2>Cases</h2>")
    parts.append(f'<ol id="cases" data-default-sort="{"dice" if run else "flags"}">')
    parts += [_case(case, review, sources) for case in review.cases]
    parts += ["</ol>", f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def _settings(review, curves: str | None) -> list[str]:
    parts = ["<h2>Learning curves</h2>"]
    best = max((r for r in review.metrics if "val/dice_mean" in r), key=lambda r: r["val/dice_mean"], default=None)
    if best is not None:
        parts.append(f"<p>best validation mean Dice {_fmt(best['val/dice_mean'], 3)} at epoch "
                     f"{int(best.get('epoch', -1))}</p>")
    parts.append(f'<img class="curves" src="{_e(curves)}" alt="learning curves">' if curves else
                 "<p class=muted>no metrics CSV in csv/version_*/ (runs of seg before the review page lack it)</p>")
    parts.append("<h2>Settings</h2>")
    if review.plan:
        parts.append("<details open><summary>the plan: each value and its reason</summary><table>"
                     "<tr><th>key</th><th>value</th><th>reason</th></tr>" + "".join(
                         f"<tr><td>{_e(k)}</td><td>{_e(v)}</td><td>{_e(r)}</td></tr>" for k, v, r in review.plan)
                     + "</table></details>")
    parts.append(f"<details><summary>config.yaml</summary><pre>{_e(review.settings)}</pre></details>"
                 if review.settings else "<p class=muted>no config.yaml in this run folder</p>")
    return parts


def _case(case, review, sources: Mapping[Path, str]) -> str:
    dice = "" if case.dice is None else f"{case.dice:.6g}"
    head = [f"<h3>{_e(case.case_id)}</h3>"]
    if case.dice is not None:
        head.append(f"<span>mean Dice {_fmt(case.dice, 3)}</span>")
    head += [f'<span class="badge">{_e(kind)}</span>' for kind in dict.fromkeys(k for k, _ in case.flags)]
    parts = [f'<li class="case" data-case="{_e(case.case_id)}" data-dice="{dice}" data-flags="{len(case.flags)}">',
             '<div class="head">' + "".join(head) + "</div>"]
    if case.flags:
        parts.append("<ul class=flags>" + "".join(f"<li>{_e(line)}</li>" for _, line in case.flags) + "</ul>")
    if case.scores:  # the numbers first: a figure fills the screen
        parts.append(_scores(case.scores, review.class_names, review.levels))
    if case.figures:
        last = len(case.figures) - 1
        buttons = [f'<button type="button" data-src="{_e(sources[path])}" data-alt="{_e(f"{case.case_id}, {label}")}"'
                   f' aria-pressed="{str(i == last).lower()}">{_e(label)}</button>'
                   for i, (label, path) in enumerate(case.figures)]
        if len(buttons) > 1:
            parts.append('<div class="epochs">' + "".join(buttons) + "</div>")
        label, path = case.figures[last]
        parts.append(f'<img class="figure" src="{_e(sources[path])}" alt="{_e(f"{case.case_id}, {label}")}">')
    else:
        parts.append("<p class=muted>no figure</p>")
    parts.append("</li>")
    return "\n".join(parts)


def _scores(scores, class_names: Sequence[str], levels: Sequence[str]) -> str:
    header = ["epoch", *[f"Dice {c}" for c in class_names], *[f"concentration {lv}" for lv in levels], "missing"]
    rows = []
    for s in scores:
        cells = [str(s.epoch), *[_fmt(s.dice.get(c), 3) for c in class_names],
                 *[_fmt(s.concentration.get(lv), 2) for lv in levels]]
        rows.append("<tr>" + "".join(f"<td class=num>{_e(v)}</td>" for v in cells) + f"<td>{_e(s.missing)}</td></tr>")
    return ("<table class=scores><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" + "".join(rows)
            + "</table>")


def curves_png(metrics: Sequence[Mapping[str, float]]) -> bytes | None:
    """The learning curves as one PNG: training loss by step, validation Dice and gate concentration by epoch."""
    def series(key: str, x: str) -> tuple[list[float], list[float]]:
        points = [(r[x], r[key]) for r in metrics if key in r and x in r]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for r in metrics for k in r})
    panels = [(title, x, [k for k in keys if k.startswith(prefix)])
              for title, x, prefix in (("training loss", "step", "train/loss"), ("validation Dice", "epoch", "val/dice_"),
                                       ("gate concentration (x uniform)", "epoch", "overlays/concentration_"))]
    panels = [p for p in panels if any(series(k, p[1])[0] for k in p[2])]
    if not panels:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure manager
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5 * len(panels), 3.4))
    for ax, (title, x, names) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for name in names:
            xs, ys = series(name, x)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name.split("/", 1)[1],
                        linewidth=2 if name.endswith(("_mean", "_epoch")) else 1)
        ax.set_title(title)
        ax.set_xlabel(x)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are whole
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()
