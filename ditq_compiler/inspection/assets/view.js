"use strict";
(function () {
  const data = JSON.parse(document.getElementById("ditq-data").textContent);
  const SVG = "http://www.w3.org/2000/svg";
  const BEFORE = "#9aa3ad", AFTER = "#2f6fd6";
  const [BAD, GOOD] = data.sqnr_bounds;

  const SPELLED = { Infinity: Infinity, "-Infinity": -Infinity, NaN: NaN };   // how the data spells non-finite numbers
  const num = (v) => (typeof v === "string" && v in SPELLED ? SPELLED[v] : v);
  const fmt = (v, digits = 3) => {
    v = num(v);
    if (v === null || v === undefined) return "-";
    if (typeof v !== "number") return String(v);
    if (!isFinite(v)) return String(v);
    if (v !== 0 && (Math.abs(v) < 1e-2 || Math.abs(v) >= 1e4)) return v.toExponential(2);
    return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  };
  const bytes = (b) => (b >= 1 << 20 ? (b / (1 << 20)).toFixed(2) + " MiB" : (b / 1024).toFixed(1) + " KiB");
  const hue = (db) => Math.max(0, Math.min(1, (db - BAD) / (GOOD - BAD))) * 120;
  const colour = (db) => {
    db = num(db);
    return db === null || db === undefined || isNaN(db) ? "#dde1e5" : `hsl(${hue(db)}, 70%, 72%)`;
  };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
    }
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }
  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- header ---------------------------------------------------------------------------------
  function renderHeader() {
    const header = document.getElementById("header");
    const count = Object.keys(data.layers).length;
    header.append(el("h1", {}, `${data.model_class} — recipe ${data.recipe} (backend ${data.backend})`));
    const facts = el("div", { class: "facts" });
    facts.append(el("span", {}, `${count} quantized layers`));
    facts.append(el("span", {}, `output SQNR vs FP: ${fmt(data.output_sqnr_db, 1)} dB`));
    const sizes = data.sizes || {};
    if (sizes.artifact_bytes && sizes.fp_checkpoint_bytes) {
      const ratio = sizes.fp_checkpoint_bytes / sizes.artifact_bytes;
      facts.append(el("span", {}, `artifact ${bytes(sizes.artifact_bytes)} vs FP checkpoint ${bytes(sizes.fp_checkpoint_bytes)} (${ratio.toFixed(2)}x smaller)`));
    } else if (sizes.fp_checkpoint_bytes) {
      facts.append(el("span", {}, `FP checkpoint ${bytes(sizes.fp_checkpoint_bytes)}`));
    }
    const cal = data.calibration || {};
    facts.append(el("span", {}, `calibration: ${cal.source || "?"}${cal.seed !== undefined ? ", seed " + cal.seed : ""}`));
    header.append(facts);
    const legend = el("div", { class: "legend" }, `layer SQNR: ≤ ${BAD} dB`);
    legend.append(el("span", { class: "bar", style: `background: linear-gradient(to right, ${colour(BAD)}, ${colour((BAD + GOOD) / 2)}, ${colour(GOOD)})` }));
    legend.append(`≥ ${GOOD} dB; grey dashed: full precision; blue: activation transforms`);
    header.append(legend);
  }

  // ---- graph ----------------------------------------------------------------------------------
  function renderGraph() {
    const graph = document.getElementById("graph");
    for (const block of data.blocks) {
      const card = el("div", { class: "block" }, el("h2", {}, block.name));
      for (const item of block.items) {
        if (item.kind === "layer") {
          const layer = data.layers[item.id];
          const button = el("button", { class: "item layer", "data-layer": item.id, title: item.name,
                                        style: `background: ${colour(layer.sqnr_db)}` },
                            item.label, el("span", { class: "sqnr" }, fmt(layer.sqnr_db, 1)));
          button.addEventListener("click", () => openPanel(item.id));
          card.append(button);
        } else if (item.kind === "transform") {
          card.append(el("div", { class: "item transform", title: item.name }, "↓ " + item.label));
        } else {
          card.append(el("div", { class: "item fp", title: item.name }, item.label + " (fp)"));
        }
      }
      if (block.other_ops) card.append(el("div", { class: "others" }, `+ ${block.other_ops} other ops`));
      graph.append(card);
    }
  }

  // ---- plots ----------------------------------------------------------------------------------
  const W = 420, H = 150, PAD = { l: 56, r: 8, t: 8, b: 22 };
  const scaler = (lo, hi, a, b) => (v) => (hi === lo ? (a + b) / 2 : a + ((v - lo) / (hi - lo)) * (b - a));

  function frame(yLo, yHi, xLabels) {
    const root = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img" });
    root.append(svg("line", { x1: PAD.l, y1: H - PAD.b, x2: W - PAD.r, y2: H - PAD.b, stroke: "#b9c0c7" }));
    root.append(svg("line", { x1: PAD.l, y1: PAD.t, x2: PAD.l, y2: H - PAD.b, stroke: "#b9c0c7" }));
    root.append(svg("text", { x: PAD.l - 4, y: PAD.t + 8, "text-anchor": "end" }, fmt(yHi, 2)));
    root.append(svg("text", { x: PAD.l - 4, y: H - PAD.b, "text-anchor": "end" }, fmt(yLo, 2)));
    xLabels.forEach(([x, text, anchor]) => root.append(svg("text", { x, y: H - 6, "text-anchor": anchor }, text)));
    return root;
  }

  function histogram(stats) {
    const edges = stats.hist_edges.map(num), series = [[stats.hist_before, BEFORE], [stats.hist_after, AFTER]];
    if (!stats.transformed) series.shift();
    const peak = Math.max(1, ...series.flatMap(([h]) => h.map((c) => Math.log1p(c))));
    const x = scaler(edges[0], edges[edges.length - 1], PAD.l, W - PAD.r), y = scaler(0, peak, H - PAD.b, PAD.t);
    const root = frame(0, Math.expm1(peak), [[PAD.l, fmt(edges[0], 2), "start"], [W - PAD.r, fmt(edges[edges.length - 1], 2), "end"]]);
    for (const [hist, fill] of series) {
      hist.forEach((count, i) => {
        if (!count) return;
        const top = y(Math.log1p(count));
        root.append(svg("rect", { x: x(edges[i]), y: top, width: Math.max(0.5, x(edges[i + 1]) - x(edges[i])),
                                  height: H - PAD.b - top, fill, "fill-opacity": 0.6 }));
      });
    }
    return root;
  }

  function band(root, xs, lo, hi, x, y, fill) {
    const points = xs.map((_, i) => `${x(i)},${y(hi[i])}`).concat(xs.map((_, i) => `${x(xs.length - 1 - i)},${y(lo[xs.length - 1 - i])}`));
    root.append(svg("polygon", { points: points.join(" "), fill, "fill-opacity": 0.35, stroke: fill }));
  }

  function rangeOverTimesteps(stats) {
    const t = stats.timesteps.map(num), sides = stats.transformed ? ["before", "after"] : ["after"];
    const values = sides.flatMap((s) => stats[s + "_min"].concat(stats[s + "_max"])).map(num);
    const lo = Math.min(...values), hi = Math.max(...values);
    const x = scaler(0, Math.max(1, t.length - 1), PAD.l, W - PAD.r), y = scaler(lo, hi, H - PAD.b, PAD.t);
    const root = frame(lo, hi, [[PAD.l, "t=" + fmt(t[0], 0), "start"], [W - PAD.r, "t=" + fmt(t[t.length - 1], 0), "end"]]);
    for (const side of sides) {
      const fill = side === "before" ? BEFORE : AFTER;
      band(root, t, stats[side + "_min"].map(num), stats[side + "_max"].map(num), x, y, fill);
      root.append(svg("polyline", { points: stats[side + "_mean"].map((m, i) => `${x(i)},${y(num(m))}`).join(" "),
                                    fill: "none", stroke: fill, "stroke-dasharray": "3 2" }));
    }
    return root;
  }

  function channelRanges(stats) {
    const sides = stats.transformed ? ["before", "after"] : ["after"];
    const values = sides.flatMap((s) => stats[`channel_${s}_min`].concat(stats[`channel_${s}_max`])).map(num);
    const lo = Math.min(...values), hi = Math.max(...values), n = stats.channel_after_min.length;
    const x = scaler(0, Math.max(1, n - 1), PAD.l + 2, W - PAD.r - 2), y = scaler(lo, hi, H - PAD.b, PAD.t);
    const root = frame(lo, hi, [[PAD.l, "channel 0", "start"], [W - PAD.r, `${stats.channels - 1}`, "end"]]);
    for (const side of sides) {
      const stroke = side === "before" ? BEFORE : AFTER, mins = stats[`channel_${side}_min`], maxs = stats[`channel_${side}_max`];
      mins.forEach((m, i) => root.append(svg("line", { x1: x(i), x2: x(i), y1: y(num(m)), y2: y(num(maxs[i])), stroke, "stroke-opacity": 0.7 })));
    }
    return root;
  }

  function keyLine(transformed) {
    const line = el("div", {});
    if (transformed) line.append(el("span", { class: "key", style: `background:${BEFORE}` }), "before the transformations");
    line.append(el("span", { class: "key", style: `background:${AFTER}` }), transformed ? "after (what the quantizer sees)" : "input (no transformations)");
    return line;
  }

  // ---- panel ----------------------------------------------------------------------------------
  function table(rows, header) {
    const t = el("table", {});
    if (header) t.append(el("tr", {}, ...header.map((h) => el("th", {}, h))));
    for (const row of rows) t.append(el("tr", {}, ...row.map((c, i) => el("td", i ? { class: "num" } : {}, c))));
    return t;
  }

  function openPanel(id) {
    const layer = data.layers[id];
    const panel = document.getElementById("panel");
    document.querySelectorAll("button.layer.selected").forEach((b) => b.classList.remove("selected"));
    const button = document.querySelector(`button.layer[data-layer="${CSS.escape(id)}"]`);
    if (button) button.classList.add("selected");
    panel.replaceChildren();
    panel.classList.add("open");
    panel.dataset.layer = id;
    panel.append(el("h2", {}, layer.name));
    panel.append(table([["role", layer.role], ["op", layer.op], ["weights", layer.weights], ["activations", layer.activations],
                        ["kernel", layer.kernel], ["SQNR (local)", fmt(layer.sqnr_db, 2) + " dB"],
                        ["transforms", layer.transforms || "none"]]));
    panel.append(el("h3", {}, "passes applied"));
    const passes = el("ol", {});
    for (const p of layer.passes) {
      const details = Object.entries(p).filter(([k]) => k !== "pass").map(([k, v]) => `${k}=${fmt(v)}`).join(", ");
      passes.append(el("li", {}, p.pass + (details ? ` (${details})` : "")));
    }
    panel.append(layer.passes.length ? passes : el("p", { class: "hint" }, "none recorded"));
    panel.append(el("h3", {}, "quantizer parameters"));
    panel.append(table(layer.parameters.map((p) => "value" in p
      ? [p.arg, Array.isArray(p.value) ? JSON.stringify(p.value) : fmt(p.value)]
      : [p.arg, `${p.dtype} [${p.shape.join("×")}]` + (p.stored_bits !== undefined && p.stored_bits !== null ? `, stored in ${p.stored_bits} bits` : ""),
         `${fmt(p.min)} .. ${fmt(p.max)}`, `mean ${fmt(p.mean)}`])));
    const stats = layer.activation_stats;
    if (!stats) {
      panel.append(el("p", { class: "hint" }, "No activation statistics (compiled without calibration data)."));
      return;
    }
    panel.append(el("h3", {}, "input activations: histogram (log counts)"), keyLine(stats.transformed), histogram(stats));
    panel.append(el("h3", {}, "range per timestep (band: min..max, dashed: mean; noisiest first)"), rangeOverTimesteps(stats));
    panel.append(el("h3", {}, `range per input channel (${stats.channels} channels)`), channelRanges(stats));
  }

  renderHeader();
  renderGraph();
  const match = /layer=([^&]+)/.exec(location.hash);
  if (match && data.layers[decodeURIComponent(match[1])]) openPanel(decodeURIComponent(match[1]));
  window.ditqView = { openPanel, layerCount: Object.keys(data.layers).length };
})();
