"""`render_report`: the exit report as one self-contained HTML page.

Inline CSS, JavaScript and SVG, no network. Tokens are coloured by exit layer on
ColorBrewer's RdYlBu scale (blue early, red late), which stays distinguishable for the
common colour-vision deficiencies; the layer number is also in every token's label,
details panel and the legend, so colour is never the only cue. Every token is
keyboard-focusable; focus or hover shows its exit layer, the confidence at each
decision exit and the top alternatives at the exit.
"""

import html
import json

# ColorBrewer RdYlBu (11 classes), reversed: blue for early layers, red for late ones.
PALETTE = (
    "#313695",
    "#4575b4",
    "#74add1",
    "#abd9e9",
    "#e0f3f8",
    "#ffffbf",
    "#fee090",
    "#fdae61",
    "#f46d43",
    "#d73027",
    "#a50026",
)


def _rgb(hex_colour: str) -> tuple:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def layer_colour(layer: int, num_layers: int) -> tuple:
    """The `(r, g, b)` of exit layer `layer` (1-based) of `num_layers`: interpolated on
    `PALETTE` from its first colour (layer 1) to its last (the final layer)."""
    if not 1 <= layer <= num_layers:
        raise ValueError(f"layer must be in [1, {num_layers}]; got {layer!r}.")
    if num_layers == 1:
        return _rgb(PALETTE[-1])
    position = (layer - 1) / (num_layers - 1) * (len(PALETTE) - 1)
    low = int(position)
    high = min(low + 1, len(PALETTE) - 1)
    weight = position - low
    a, b = _rgb(PALETTE[low]), _rgb(PALETTE[high])
    return tuple(round(x + (y - x) * weight) for x, y in zip(a, b))


def _text_colour(rgb) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "#000" if luminance > 140 else "#fff"


def _css_colour(rgb) -> str:
    return f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"


def _shown(piece: str) -> str:
    """A token's visible text: an empty piece shows as ∅, a newline as ↵ (without
    breaking the line: a model that repeats newlines would stretch the map)."""
    if piece == "":
        return "\u2205"
    return piece.replace("\n", "\u21b5").replace("\t", "\u21e5")


def _histogram_svg(histogram, num_layers: int, title: str) -> str:
    width, height, gap = 12, 40, 2
    peak = max(histogram) or 1
    bars = []
    for index, count in enumerate(histogram):
        bar = round(height * count / peak)
        fill = _css_colour(layer_colour(index + 1, num_layers))
        bars.append(
            f'<rect x="{index * (width + gap)}" y="{height - bar}" width="{width}" '
            f'height="{bar}" fill="{fill}" stroke="#333" stroke-width="0.5">'
            f"<title>layer {index + 1}: {count} tokens</title></rect>"
        )
    total_width = len(histogram) * (width + gap)
    return (
        f'<svg class="hist" role="img" aria-label="{html.escape(title)}" width="{total_width}" '
        f'height="{height + 1}" viewBox="0 0 {total_width} {height + 1}">{"".join(bars)}</svg>'
    )


def _percent(value) -> str:
    return f"{100 * value:.0f}%"


def _stats_line(stats) -> str:
    return (
        f"{stats['tokens']} tokens · exit rate {_percent(stats['exit_rate'])} · avg layer "
        f"{stats['avg_exit_layer']:.2f} · agreement {_percent(stats['agreement'])} · "
        f"{stats['tokens_per_second']:.1f} tok/s ({stats['measured_speedup']:.2f}× measured, "
        f"{stats['ideal_speedup']:.2f}× ideal)"
    )


def _token_spans(run, run_index, num_layers) -> str:
    spans = []
    for token_index, token in enumerate(run["tokens"]):
        layer = token["exit_layer"]
        rgb = layer_colour(layer, num_layers)
        label = f"token {token['token']!r}, exit layer {layer} of {num_layers}"
        spans.append(
            f'<span class="tok" tabindex="0" data-run="{run_index}" data-token="{token_index}" '
            f'data-layer="{layer}" aria-label="{html.escape(label)}" style="background:'
            f'{_css_colour(rgb)};color:{_text_colour(rgb)}">{html.escape(_shown(token["token"]))}'
            "</span>"
        )
    return "".join(spans)


def _grid_rows(results) -> str:
    settings, prompts = results["settings"], results["prompts"]
    rows = []
    entries = [("all", "all prompts", row) for row in results["summary"]]
    entries += [
        (str(run["prompt"]), _short(prompts[run["prompt"]]["text"]), run | run["stats"])
        for run in results["runs"]
    ]
    for prompt_key, prompt_label, row in entries:
        setting = settings[row["setting"]]
        cells = [
            ("text", prompt_label),
            ("text", setting["mode"]),
            ("text", setting["criterion"] or "–"),
            ("number", setting["threshold"]),
            ("number", setting["kl_strength"]),
            ("number", row["tokens"]),
            ("number", row["exit_rate"]),
            ("number", row["avg_exit_layer"]),
            ("number", row["agreement"]),
            ("number", row["tokens_per_second"]),
            ("number", row["measured_speedup"]),
            ("number", row["ideal_speedup"]),
        ]
        html_cells = []
        for kind, value in cells:
            if kind == "number":
                shown = (
                    "–"
                    if value is None
                    else (f"{value:.3g}" if isinstance(value, float) else value)
                )
                sort = "" if value is None else value
                html_cells.append(f'<td data-sort="{sort}">{shown}</td>')
            else:
                html_cells.append(
                    f'<td data-sort="{html.escape(str(value))}">{html.escape(str(value))}</td>'
                )
        hidden = "" if prompt_key == "all" else " hidden"
        rows.append(f'<tr data-prompt="{prompt_key}"{hidden}>{"".join(html_cells)}</tr>')
    return "".join(rows)


def _short(text: str, length: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= length else text[: length - 1] + "…"


COLUMNS = (
    "prompt",
    "mode",
    "criterion",
    "threshold",
    "KL strength",
    "tokens",
    "exit rate",
    "avg layer",
    "agreement",
    "tok/s",
    "measured speedup",
    "ideal speedup",
)


def render_report(results: dict) -> str:
    """The HTML page of `results` (`toex_tf.analysis.report.collect_report`)."""
    num_layers = results["model"]["num_layers"]
    settings = results["settings"]
    translation = results.get("kind") == "translation"
    legend = "".join(
        f'<span class="swatch" style="background:{_css_colour(layer_colour(layer, num_layers))};'
        f'color:{_text_colour(layer_colour(layer, num_layers))}">{layer}</span>'
        for layer in range(1, num_layers + 1)
    )
    header_cells = "".join(
        f'<th scope="col" aria-sort="none"><button type="button" data-column="{i}">'
        f"{html.escape(name)}</button></th>"
        for i, name in enumerate(COLUMNS)
    )
    options = '<option value="all">all prompts (summary)</option>' + "".join(
        f'<option value="{i}">{i + 1}: {html.escape(_short(p["text"]))}</option>'
        for i, p in enumerate(results["prompts"])
    )
    sections = []
    for p_index, prompt in enumerate(results["prompts"]):
        source = html.escape(prompt["text"])
        heading = f"Source {p_index + 1}" if translation else f"Prompt {p_index + 1}"
        parts = [f'<section class="prompt"><h2>{heading}</h2><p class="source">{source}</p>']
        if "reference" in prompt:
            parts.append(f'<p class="reference">Reference: {html.escape(prompt["reference"])}</p>')
        for run_index, run in enumerate(results["runs"]):
            if run["prompt"] != p_index:
                continue
            setting = settings[run["setting"]]
            stats = run["stats"]
            title = f"exit layers of {setting['label']}"
            parts.append(
                f'<div class="run"><h3>{html.escape(setting["label"])}</h3>'
                f'<p class="stats">{_stats_line(stats)}</p>'
                f"{_histogram_svg(stats['histogram'], num_layers, title)}"
                f'<p class="tokens" data-run="{run_index}">'
                f"{_token_spans(run, run_index, num_layers)}</p></div>"
            )
        parts.append("</section>")
        sections.append("".join(parts))
    data = json.dumps(
        {
            "num_layers": num_layers,
            "runs": [
                {"decision_layers": run["decision_layers"], "tokens": run["tokens"]}
                for run in results["runs"]
            ],
        },
        ensure_ascii=False,
    ).replace("</", "<\\/")
    model = results["model"]
    return _PAGE.format(
        title="toex_tf exit report",
        model=html.escape(
            f"{model['name']}: {num_layers} layers, exits {model['exit_layers']}; "
            f"{results.get('max_new_tokens')} new tokens per prompt; {results.get('timing', '')}; "
            f"{results.get('machine', '')}, {results.get('created', '')}"
        ),
        legend=legend,
        header_cells=header_cells,
        rows=_grid_rows(results),
        options=options,
        sections="".join(sections),
        data=data,
        script=_SCRIPT,
        style=_STYLE,
    )


def write_report(results: dict, path: str) -> str:
    """Writes `render_report(results)` to `path`; returns `path`."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_report(results))
    return path


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#111;max-width:72rem}
.tok{white-space:pre-wrap;border-radius:3px;padding:0 1px;margin:0 1px 0 0;cursor:default;
 font-family:ui-monospace,monospace;outline-offset:1px}
.tok:focus,.tok:hover{outline:2px solid #000}
.swatch{display:inline-block;min-width:1.6em;text-align:center;font-size:.8em;padding:1px 2px}
.tokens{line-height:1.9}
.stats{color:#333;font-size:.9em;margin:.2em 0}
table{border-collapse:collapse;font-size:.85em}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}
td:nth-child(-n+3){text-align:left}
th button{font:inherit;background:none;border:none;cursor:pointer;font-weight:bold}
th[aria-sort=ascending] button::after{content:" ▲"}
th[aria-sort=descending] button::after{content:" ▼"}
#details{position:fixed;right:1rem;top:1rem;width:20rem;background:#fff;border:1px solid #333;
 padding:.5rem;font-size:.85em;box-shadow:0 2px 6px rgba(0,0,0,.3)}
#details[hidden]{display:none}
.source{font-weight:bold}.reference{color:#444}
"""

_SCRIPT = """
(function(){
const data=JSON.parse(document.getElementById('report-data').textContent);
const panel=document.getElementById('details');
const ENTITIES={'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'};
function esc(s){return String(s).replace(/[&<>"]/g,c=>ENTITIES[c]);}
function show(el){
 const run=data.runs[+el.dataset.run], tok=run.tokens[+el.dataset.token];
 let h='<strong>'+esc(JSON.stringify(tok.token))+'</strong> exit layer <b class="exit-layer">'+
   tok.exit_layer+'</b> of '+data.num_layers;
 if(run.decision_layers.length){
  h+='<table class="conf"><tr><th>decision layer</th><th>confidence</th></tr>';
  run.decision_layers.forEach((layer,i)=>{const c=(tok.confidences||[])[i];
   const shown=(c===null||c===undefined)?'not computed':c.toFixed(4);
   h+='<tr><td>'+layer+'</td><td>'+shown+'</td></tr>';});
  h+='</table>';
 }
 if(tok.alternatives&&tok.alternatives.length){
  h+='<div>top alternatives at the exit:</div><ol class="alts">'+tok.alternatives.map(
   a=>'<li>'+esc(JSON.stringify(a[0]))+' '+(100*a[1]).toFixed(1)+'%</li>').join('')+'</ol>';
 }
 panel.innerHTML=h; panel.hidden=false;
}
document.querySelectorAll('.tok').forEach(el=>{
 el.addEventListener('mouseenter',()=>show(el)); el.addEventListener('focus',()=>show(el));
});
const table=document.getElementById('grid');
table.querySelectorAll('th button').forEach(btn=>{
 btn.addEventListener('click',()=>{
  const th=btn.parentElement, col=+btn.dataset.column;
  const dir=th.getAttribute('aria-sort')==='ascending'?'descending':'ascending';
  table.querySelectorAll('th').forEach(h=>h.setAttribute('aria-sort','none'));
  th.setAttribute('aria-sort',dir);
  const body=table.tBodies[0], rows=Array.from(body.rows);
  const key=r=>{const v=r.cells[col].dataset.sort; const n=parseFloat(v);
   return v!==''&&!isNaN(n)&&isFinite(v)?n:v;};
  rows.sort((a,b)=>{const x=key(a),y=key(b);
   const c=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
   return dir==='ascending'?c:-c;});
  rows.forEach(r=>body.appendChild(r));
 });
});
document.getElementById('prompt-filter').addEventListener('change',e=>{
 table.querySelectorAll('tbody tr').forEach(r=>{r.hidden=r.dataset.prompt!==e.target.value;});
});
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{style}</style></head>
<body>
<h1>{title}</h1>
<p class="model">{model}</p>
<p class="legend" aria-label="colour legend: exit layer">Exit layer: {legend}
 (blue: early, red: late; hover or focus a token for its details)</p>
<div id="details" role="status" aria-live="polite" hidden></div>
<h2>Comparison</h2>
<label for="prompt-filter">Show:</label> <select id="prompt-filter">{options}</select>
<table id="grid"><thead><tr>{header_cells}</tr></thead><tbody>{rows}</tbody></table>
{sections}
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body></html>
"""
