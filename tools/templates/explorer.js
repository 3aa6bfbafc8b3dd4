// mlxc explorer: draws the JSON document above (tools/explorer.py writes it). No libraries, no network.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("mlxc-data").textContent);
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k === "html") e.innerHTML = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const k of kids) if (k !== null && k !== undefined && k !== false) e.append(k);
    return e;
  }
  function sv(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== null && v !== undefined) e.setAttribute(k, v);
    return e;
  }
  const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  const num = (n) => Number(n).toLocaleString("en-US");
  function human(b) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return (i ? b.toFixed(1) : b) + " " + u[i];
  }
  function count(n) {
    return n >= 1e9 ? (n / 1e9).toFixed(2) + " B" : n >= 1e6 ? (n / 1e6).toFixed(1) + " M" : num(n);
  }
  function changes(c) {
    const done = Object.entries(c || {}).filter(([, v]) => v).map(([k, v]) => k + ": " + v);
    return done.length ? done.join(", ") : "no changes";
  }

  // ------------------------------------------------------------------------------------------ syntax colouring
  const IR_RE = /(\/\/.*$)|(%[\w.]+)|(@[\w.]+)|\b(func|param|derive|return|state)\b|\b((?:f32|f16|bf16|i32|i64|u32|bool)\[[^\]]*\](?: q\w+)?)/g;
  const PY_RE = /(#.*$)|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|\b(def|class|return|for|in|if|else|elif|import|from|None|True|False|self|lambda|and|or|not|is|with|as|while|raise|try|except|pass|super)\b/g;
  function colour(line, re, classes) {
    let out = "", last = 0;
    line.replace(re, function () {
      const m = arguments[0], off = arguments[arguments.length - 2];
      let k = 1;
      while (k <= classes.length && arguments[k] === undefined) k++;
      out += esc(line.slice(last, off)) + '<span class="' + classes[k - 1] + '">' + esc(m) + "</span>";
      last = off + m.length;
      return m;
    });
    return out + esc(line.slice(last));
  }
  const hlIR = (l) => colour(l, IR_RE, ["c", "v", "f", "k", "t"]);
  const hlPy = (l) => colour(l, PY_RE, ["c", "st", "k"]);

  // ------------------------------------------------------------------------------------------------- header
  function header() {
    $("model-title").textContent = D.title + " — " + D.source;
    const s = D.summary, bits = [];
    if (s.family) bits.push("family <b>" + esc(s.family) + "</b>");
    if (s.layers !== null && s.layers !== undefined) bits.push("<b>" + s.layers + "</b> layers");
    bits.push("<b>" + s.functions + "</b> IR functions", "<b>" + num(s.ops) + "</b> ops");
    bits.push("<b>" + count(s.parameters) + "</b> parameters (" + human(s.stored_bytes) + " stored)");
    bits.push("<b>" + num(s.module_lines) + "</b> generated lines");
    const opts = Object.entries(D.options || {}).map(([k, v]) => k + "=" + (Array.isArray(v) ? v.join(",") : v));
    if (opts.length) bits.push("options " + esc(opts.join(" ")));
    bits.push("mlxc " + esc(D.version) + ", " + esc(D.created));
    $("summary").innerHTML = bits.join(" · ");
    if (D.notes && D.notes.length) $("summary").after(el("p", { class: "notes", text: D.notes.join(" · ") }));
  }

  // ----------------------------------------------------------------------------------------------------- tabs
  const drawn = {};
  function showTab(name) {
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("on", b.dataset.tab === name);
    for (const s of document.querySelectorAll(".tab")) s.classList.toggle("on", s.id === "tab-" + name);
    if (name === "graph" && !drawn.graph) { drawn.graph = true; showFunction(D.functions[0].name); }
    if (name === "params" && !drawn.params) { drawn.params = true; params(); }
    if (name === "layers" && !drawn.layers) { drawn.layers = true; layers(); }
    if (name === "module" && !drawn.module) { drawn.module = true; module([]); }
  }

  // -------------------------------------------------------------------------------------------------- pipeline
  const texts = [];
  D.stages.forEach((s, k) => { texts.push(s.same ? texts[k - 1] : s.text); });
  let stage = D.stages.length - 1;

  function stages() {
    const ol = $("stages");
    D.stages.forEach((s, k) => {
      const none = !s.same && s.diff && s.diff.every((op) => op[0] === "e") || s.same;
      ol.append(el("li", { "data-stage": k, onclick: () => showStage(k) },
        el("span", { class: "n", text: String(k).padStart(2, "0") }),
        el("span", { class: "name", text: s.name }),
        s.ms !== null && s.ms !== undefined ? el("span", { class: "ms", text: s.ms.toFixed(1) + " ms" }) : null,
        el("span", { class: "ch" + (k && none ? " none" : ""), text: k ? changes(s.changes) : "lowered from the spec" })));
    });
    ol.append(el("li", { class: "module", "data-stage": "module", onclick: () => { showTab("module"); } },
      el("span", { class: "name", text: "generated MLX module" }),
      el("span", { class: "ch", text: D.module_error ? "not generated" : num(D.summary.module_lines) + " lines" })));
    $("only-changes").addEventListener("change", () => showStage(stage));
  }

  function diffRows(k) {
    // [cls, old line no, new line no, text]; the first stage is all context
    const cur = texts[k].split("\n");
    if (cur[cur.length - 1] === "") cur.pop();
    const s = D.stages[k];
    if (k === 0 || s.same || !s.diff) return cur.map((t, i) => ["", null, i + 1, t]);
    const prev = texts[k - 1].split("\n");
    const rows = [];
    for (const [tag, i1, i2, j1, j2] of s.diff) {
      if (tag === "e") for (let i = 0; i < i2 - i1; i++) rows.push(["", i1 + i + 1, j1 + i + 1, cur[j1 + i]]);
      if (tag === "r" || tag === "d") for (let i = i1; i < i2; i++) rows.push(["del", i + 1, null, prev[i]]);
      if (tag === "r" || tag === "i") for (let j = j1; j < j2; j++) rows.push(["add", null, j + 1, cur[j]]);
    }
    return rows.filter((r) => r[3] !== undefined);
  }

  function showStage(k) {
    stage = k;
    for (const li of $("stages").children) li.classList.toggle("on", li.dataset.stage === String(k));
    const s = D.stages[k];
    $("stage-title").textContent = k ? "after " + s.name : "input: the lowered program";
    let rows = diffRows(k);
    const added = rows.filter((r) => r[0] === "add").length, removed = rows.filter((r) => r[0] === "del").length;
    const stats = [];
    if (k) stats.push(changes(s.changes), "+" + added + " −" + removed + " lines");
    if (s.ms !== null && s.ms !== undefined) stats.push(s.ms.toFixed(1) + " ms");
    $("stage-stats").textContent = stats.join(" · ");
    if ($("only-changes").checked && k) {
      const keep = new Set();
      rows.forEach((r, i) => { if (r[0]) for (let d = -3; d <= 3; d++) keep.add(i + d); });
      const out = [];
      let skipped = 0;
      rows.forEach((r, i) => {
        if (keep.has(i)) { if (skipped) out.push(["gap", null, null, "… " + skipped + " unchanged lines"]); skipped = 0; out.push(r); }
        else skipped++;
      });
      if (skipped) out.push(["gap", null, null, "… " + skipped + " unchanged lines"]);
      rows = out.length ? out : [["gap", null, null, "no changes"]];
    }
    const html = rows.map(([cls, a, b, t]) => '<span class="l ' + cls + '"><span class="g">' + (b || a || "") +
      '</span><span class="s">' + (cls === "add" ? "+" : cls === "del" ? "−" : "") + "</span>" +
      (cls === "gap" ? esc(t) : hlIR(t)) + "</span>");
    $("stage-text").innerHTML = html.join("");
    setHash("pipeline/" + k);
  }

  // ------------------------------------------------------------------------------------------------- module
  function module(lines, scroll) {
    const pre = $("module-text");
    if (D.module_error) { pre.textContent = "The module could not be generated: " + D.module_error; return; }
    if (!pre.dataset.done) {
      const rows = D.module.split("\n");
      if (rows[rows.length - 1] === "") rows.pop();
      let doc = false;  // inside a triple-quoted string
      pre.innerHTML = rows.map((t, i) => {
        let html;
        const q = (t.match(/"""/g) || []).length;
        if (doc || (q === 1 && /^\s*"""/.test(t)) || (q === 2 && /^\s*""".*"""\s*$/.test(t))) {
          html = '<span class="st">' + esc(t) + "</span>";
          if (q % 2) doc = !doc;
        } else html = hlPy(t);
        return '<span class="l" id="m' + (i + 1) + '"><span class="g">' + (i + 1) + "</span>" + html + "</span>";
      }).join("");
      pre.dataset.done = "1";
      $("module-stats").textContent = num(rows.length) + " lines · the file `mlxc compile` writes as model.py";
    }
    for (const e of pre.querySelectorAll(".hl")) e.classList.remove("hl");
    for (const n of lines) { const e = $("m" + n); if (e) e.classList.add("hl"); }
    if (lines.length && scroll !== false) {
      const e = $("m" + lines[0]);
      if (e) e.scrollIntoView({ block: "center" });
    }
  }
  function openModule(lines) {
    showTab("module");
    module(lines);
    setHash("module/" + (lines[0] || ""));
  }

  // -------------------------------------------------------------------------------------------------- graphs
  let fn = null, nodesById = {}, selected = null;
  const view = { s: 1, x: 0, y: 0 };

  function functions() {
    const ul = $("functions");
    for (const f of D.functions) {
      const prefixes = f.calls.map((c) => c[0]);
      let meta = f.name === "main" ? "entry" : "called " + prefixes.length + "×";
      if (prefixes.length) meta += " (" + (prefixes.length > 2 ? prefixes[0] + " … " + prefixes[prefixes.length - 1] : prefixes.join(", ")) + ")";
      const ops = f.nodes.filter((n) => n.kind === "op" && !n.loadtime).length;
      meta += " · " + ops + " ops";
      if (f.states.length) meta += " · state " + summariseStates(f.states);
      ul.append(el("li", { "data-fn": f.name, onclick: () => showFunction(f.name) },
        el("span", { class: "name", text: "@" + f.name }), el("span", { class: "meta", text: meta })));
    }
    const lg = $("legend");
    lg.append(el("h3", { text: "Op groups" }));
    for (const [g, c] of Object.entries(D.groups)) lg.append(el("span", {}, el("i", { style: "background:" + c }), g));
    lg.append(el("span", {}, el("i", { style: "background:" + D.kinds.param + ";border-style:dashed" }), "parameter"));
    lg.append(el("span", {}, el("i", { style: "background:#fff;border-style:dashed" }), "load-time (derive)"));
  }
  function summariseStates(states) {
    const c = {};
    for (const s of states) c[s] = (c[s] || 0) + 1;
    return Object.entries(c).map(([s, n]) => (n > 1 ? n + "× " : "") + s).join(", ");
  }

  function showFunction(name, nodeId) {
    const f = D.functions.find((x) => x.name === name);
    if (!f) return;
    if (!drawn.graph) { drawn.graph = true; }
    for (const li of $("functions").children) li.classList.toggle("on", li.dataset.fn === name);
    if (fn !== f) {
      fn = f;
      nodesById = {};
      for (const n of f.nodes) nodesById[n.id] = n;
      draw(f);
      selected = null;
      $("details").innerHTML = '<p class="hint">Select an op to see what it is, what it reads, who reads it, the state it keeps, its kernel and the generated lines it became.</p>';
    }
    $("fn-title").textContent = f.signature;
    const ops = f.nodes.filter((n) => n.kind === "op" && !n.loadtime).length, load = f.nodes.filter((n) => n.loadtime).length;
    $("fn-stats").textContent = ops + " ops" + (load ? " + " + load + " load-time" : "") + (f.states.length ? " · state " + summariseStates(f.states) : "") +
      " · layout: " + f.engine;
    if (nodeId) select(nodeId, true);
    else setHash("graph/" + name);
  }

  function draw(f) {
    const svg = $("graph");
    svg.innerHTML = "";
    const defs = sv("defs");
    const marker = sv("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", markerUnits: "userSpaceOnUse", orient: "auto" });
    marker.append(sv("path", { d: "M0,0L10,5L0,10z", fill: "#8c959f" }));
    defs.append(marker);
    svg.append(defs);
    const g = sv("g", { id: "viewport" });
    svg.append(g);
    f.edges.forEach(([a, b, d, t], i) => {
      const p = sv("path", { class: "edge", d: d, "data-from": a, "data-to": b, "data-i": i, "marker-end": "url(#arrow)" });
      const title = sv("title");
      title.textContent = t;
      p.append(title);
      g.append(p);
    });
    for (const n of f.nodes) {
      if (n.hidden) continue;
      const cls = "node " + n.kind + (n.loadtime ? " loadtime" : "");
      const ng = sv("g", { class: cls, "data-id": n.id, transform: "translate(" + (n.x - n.w / 2) + "," + (n.y - n.h / 2) + ")" });
      const fill = n.kind === "op" ? D.groups[n.group] : D.kinds[n.kind];
      ng.append(sv("rect", { width: n.w, height: n.h, rx: n.kind === "op" ? 4 : n.h / 2, fill: fill || "#fff" }));
      const t1 = sv("text", { x: 8, y: 14 });
      t1.textContent = n.label;
      const t2 = sv("text", { x: 8, y: 27, class: "sub" });
      t2.textContent = n.sub;
      ng.append(t1, t2);
      if (n.kernel && n.kernel !== "reference") {
        const bw = 6 * n.kernel.length + 8;  // a kernel other than the reference: a badge in the corner
        ng.append(sv("rect", { x: n.w - bw - 3, y: 3, width: bw, height: 12, rx: 6, fill: "#8250df" }));
        const bt = sv("text", { x: n.w - bw + 1, y: 12, class: "badge" });
        bt.textContent = n.kernel;
        ng.append(bt);
      }
      const title = sv("title");
      title.textContent = n.text || n.label + " : " + n.sub;
      ng.append(title);
      ng.addEventListener("click", (e) => { e.stopPropagation(); select(n.id); });
      g.append(ng);
    }
    start(f);
  }

  function apply() {
    const g = $("viewport");
    if (g) g.setAttribute("transform", "translate(" + view.x + "," + view.y + ") scale(" + view.s + ")");
  }
  function start(f) {
    // width fits, never magnified; a tall graph starts at its top
    const c = $("canvas"), W = c.clientWidth || 800;
    view.s = Math.min(1, W / Math.max(f.width, 1));
    view.x = (W - f.width * view.s) / 2;
    view.y = 0;
    apply();
  }
  function fit() {
    if (!fn) return;
    const c = $("canvas"), W = c.clientWidth || 800, H = c.clientHeight || 600;
    view.s = Math.min(W / Math.max(fn.width, 1), H / Math.max(fn.height, 1), 2);
    view.x = (W - fn.width * view.s) / 2;
    view.y = (H - fn.height * view.s) / 2;
    apply();
  }
  function zoom(factor, cx, cy) {
    const c = $("canvas");
    if (cx === undefined) { cx = c.clientWidth / 2; cy = c.clientHeight / 2; }
    const s = Math.max(0.05, Math.min(4, view.s * factor));
    view.x = cx - (cx - view.x) * (s / view.s);
    view.y = cy - (cy - view.y) * (s / view.s);
    view.s = s;
    apply();
  }
  function centre(n) {
    const c = $("canvas"), W = c.clientWidth, H = c.clientHeight;
    const x = n.x * view.s + view.x, y = n.y * view.s + view.y;
    if (x < 40 || x > W - 40 || y < 30 || y > H - 30) {
      view.x = W / 2 - n.x * view.s;
      view.y = H / 2 - n.y * view.s;
      apply();
    }
  }
  function canvasEvents() {
    const c = $("canvas");
    c.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = c.getBoundingClientRect();
      zoom(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      if (e.target.closest && e.target.closest(".node")) return;
      drag = { x: e.clientX, y: e.clientY, vx: view.x, vy: view.y };
      c.classList.add("drag");
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      view.x = drag.vx + e.clientX - drag.x;
      view.y = drag.vy + e.clientY - drag.y;
      apply();
    });
    const stop = () => { drag = null; c.classList.remove("drag"); };
    c.addEventListener("pointerup", stop);
    c.addEventListener("pointercancel", stop);
    $("zoom-in").addEventListener("click", () => zoom(1.25));
    $("zoom-out").addEventListener("click", () => zoom(0.8));
    $("zoom-fit").addEventListener("click", fit);
    $("find").addEventListener("keydown", (e) => { if (e.key === "Enter") find(e.target.value.trim()); });
  }
  function find(q) {
    if (!fn || !q) return;
    const bare = q.replace(/^%/, "");
    const hit = fn.nodes.find((n) => (n.results || []).some((r) => r[0] === bare) || (n.value && n.value[0] === bare)) ||
      fn.nodes.find((n) => n.label.includes(q) || n.sub.includes(q));
    for (const e of document.querySelectorAll("#graph .node.found")) e.classList.remove("found");
    if (hit) { select(hit.id); const e = document.querySelector('#graph .node[data-id="' + hit.id + '"]'); if (e) e.classList.add("found"); }
  }

  function link(text, onclick) { return el("a", { onclick: onclick, text: text }); }
  function nodeLink(id) {
    const n = nodesById[id];
    if (n && n.hidden) return nodeLink(n.copies[0]);
    return link(n ? n.label + (n.kind === "op" ? " → " + n.sub.split(":")[0] : "") : id, () => select(id));
  }

  function select(id) {
    let n = nodesById[id];
    if (n && n.hidden) { id = n.copies[0]; n = nodesById[id]; }
    if (!n) return;
    selected = id;
    for (const e of document.querySelectorAll("#graph .node")) {
      e.classList.toggle("on", e.dataset.id === id);
      e.classList.remove("near");
    }
    for (const e of document.querySelectorAll("#graph .edge")) {
      const on = e.dataset.from === id || e.dataset.to === id;
      e.classList.toggle("on", on);
      if (on) {
        const other = e.dataset.from === id ? e.dataset.to : e.dataset.from;
        const o = document.querySelector('#graph .node[data-id="' + other + '"]');
        if (o) o.classList.add("near");
      }
    }
    details(n);
    centre(n);
    setHash("graph/" + fn.name + "/" + id);
  }

  function details(n) {
    const box = $("details");
    box.innerHTML = "";
    if (n.kind === "op") {
      box.append(el("h3", {}, n.op, el("span", { class: "chip", style: "background:" + D.groups[n.group], text: n.group }),
        n.loadtime ? el("span", { class: "chip", text: "load time" }) : null));
      if (D.docs[n.op]) box.append(el("p", { class: "doc", text: D.docs[n.op] }));
      box.append(el("pre", { html: hlIR(n.text) }));
      if (n.attrs.length) {
        box.append(el("h4", { text: "Attributes" }));
        const t = el("table", { class: "grid" });
        for (const [k, v, dflt] of n.attrs) t.append(el("tr", {}, el("td", { class: "mono", text: k }), el("td", { class: "mono", text: v + (dflt ? "  (default)" : "") })));
        box.append(t);
      }
      box.append(el("h4", { text: "Operands" }));
      box.append(el("ul", {}, ...n.operands.map(([name, type, src]) => el("li", {}, el("code", { text: name + " : " + type }),
        src ? el("span", {}, " ← ", nodeLink(src)) : null))));
      box.append(el("h4", { text: "Results" }));
      box.append(el("ul", {}, ...n.results.map(([name, type]) => el("li", {}, el("code", { text: "%" + name + " : " + type })))));
      users(box, n);
      box.append(el("h4", { text: "State" }));
      box.append(el("p", { text: n.states.length ? "keeps " + summariseStates(n.states) + " between calls" : (n.effects ? "none; has effects" : "none: pure") }));
      box.append(el("h4", { text: "Kernel" }));
      box.append(el("p", { text: n.kernel ? n.kernel : "no kernel attribute: the op's plain MLX fragment" }));
      if (n.callee) {
        box.append(el("h4", { text: "Callee" }));
        box.append(el("p", {}, link("@" + n.callee, () => showFunction(n.callee)), document.createTextNode(" with parameters under " + (n.prefix || "(no prefix)") + ".")));
      }
      box.append(el("h4", { text: "Generated code" }));
      if (n.loadtime) {
        box.append(el("p", { text: "Runs once when the weights are bound (load time), not in the module's forward pass." +
          (n.held ? " The module holds the result:" : " Its result feeds other load-time ops.") }));
      }
      code(box, n.lines);
    } else if (n.kind === "param") {
      box.append(el("h3", {}, n.label, el("span", { class: "chip", style: "background:" + D.kinds.param, text: "parameter" })));
      box.append(el("p", {}, el("code", { text: n.sub }), document.createTextNode(" · " + human(n.bytes) + " stored")));
      const rows = D.params.filter((r) => r[8] === fn.name && r[9] === n.id);
      box.append(el("h4", { text: "Global names (" + rows.length + ")" }));
      const t = el("table", { class: "grid" }, el("tr", {}, el("th", { text: "IR" }), el("th", { text: D.checkpoint_kind })));
      for (const r of rows.slice(0, 12)) t.append(el("tr", {}, el("td", { class: "mono", text: r[0] }), el("td", { class: "mono", text: r[1] || "—" })));
      box.append(t);
      if (rows.length > 12) box.append(el("p", { class: "hint", text: "… and " + (rows.length - 12) + " more (Parameters tab)" }));
      users(box, n);
      box.append(el("h4", { text: "Generated code" }));
      if (!n.held) box.append(el("p", { text: "Read only at load time: the module holds what is derived from it." }));
      code(box, n.lines);
    } else {
      box.append(el("h3", { text: n.label }));
      box.append(el("p", {}, el("code", { text: n.sub })));
      box.append(el("p", { class: "hint", text: n.kind === "input" ? "an input of @" + fn.name : "what @" + fn.name + " returns" }));
      if (n.kind === "input") users(box, n);
    }
  }
  function users(box, n) {
    box.append(el("h4", { text: "Users (" + n.users.length + ")" }));
    box.append(n.users.length ? el("ul", {}, ...n.users.map((u) => el("li", {}, nodeLink(u)))) : el("p", { class: "hint", text: "none" }));
  }
  function code(box, lines) {
    if (!lines || !lines.length) {
      box.append(el("p", { class: "hint", text: D.module_error ? "no module was generated" : "no line of the module (this op does not appear in it)" }));
      return;
    }
    const rows = D.module.split("\n");
    box.append(el("pre", { html: lines.map((l) => '<span class="c">' + String(l).padStart(4) + "</span>  " + hlPy(rows[l - 1] || "")).join("\n") }));
    box.append(el("p", {}, link("show in the module (line " + lines[0] + ")", () => openModule(lines))));
  }

  // ---------------------------------------------------------------------------------------------- parameters
  function params() {
    const tot = $("totals");
    for (const [key, title] of [["stored", "Stored (as the checkpoint holds them)"], ["runtime", "Held by the generated module"]]) {
      const rows = D.totals[key];
      const t = el("table", { class: "grid", "data-totals": key }, el("tr", {}, el("th", { text: "type" }), el("th", { class: "num", text: "tensors" }),
        el("th", { class: "num", text: "parameters" }), el("th", { class: "num", text: "bytes" })));
      let n = 0, p = 0, b = 0;
      for (const r of rows) {
        t.append(el("tr", {}, el("td", { class: "mono", text: r.type }), el("td", { class: "num", text: num(r.tensors) }),
          el("td", { class: "num", text: num(r.parameters) }), el("td", { class: "num", text: num(r.bytes) + " (" + human(r.bytes) + ")" })));
        n += r.tensors; p += r.parameters; b += r.bytes;
      }
      t.append(el("tr", { class: "total" }, el("td", { text: "total" }), el("td", { class: "num", text: num(n) }),
        el("td", { class: "num", "data-total-parameters": p, text: num(p) }), el("td", { class: "num", "data-total-bytes": b, text: num(b) + " (" + human(b) + ")" })));
      tot.append(el("div", {}, el("h3", { text: title }), t));
    }
    const table = $("param-table");
    table.append(el("tr", {}, ...["IR name", D.checkpoint_kind + " name", "shape", "dtype / quantization", "parameters", "bytes", "origin", "held at run time"].map(
      (h, i) => el("th", { class: i === 4 || i === 5 ? "num" : null, text: h }))));
    const trs = D.params.map((r) => {
      const tr = el("tr", { class: "click", title: "show in @" + r[8], onclick: () => { showTab("graph"); showFunction(r[8], r[9]); } },
        el("td", { class: "mono", text: r[0] }), el("td", { class: "mono", text: r[1] || "—" }), el("td", { class: "mono", text: r[2] }),
        el("td", { class: "mono", text: r[3] }), el("td", { class: "num", text: num(r[4]) }), el("td", { class: "num", text: num(r[5]) }),
        el("td", { class: "mono", text: r[6] }), el("td", { text: r[7] ? "yes" : "" }));
      tr.dataset.key = (r[0] + " " + (r[1] || "")).toLowerCase();
      table.append(tr);
      return tr;
    });
    const shown = () => { const n = trs.filter((t) => t.style.display !== "none").length; $("param-count").textContent = n + " of " + trs.length + " rows"; };
    $("param-filter").addEventListener("input", (e) => {
      const q = e.target.value.toLowerCase();
      for (const t of trs) t.style.display = !q || t.dataset.key.includes(q) ? "" : "none";
      shown();
    });
    shown();
  }

  // -------------------------------------------------------------------------------------------------- layers
  function layers() {
    const table = $("layer-table");
    table.append(el("tr", {}, ...["layer", "kind", "mixer", "FFN", "function", "state", "parameters"].map(
      (h) => el("th", { class: h === "parameters" ? "num" : null, text: h }))));
    const kinds = {};
    let total = 0;
    for (const r of D.layers) {
      kinds[r.kind] = (kinds[r.kind] || 0) + 1;
      total += r.parameters;
      table.append(el("tr", { "data-layer": r.index },
        el("td", { class: "num", text: r.index }), el("td", { class: "kind-" + r.kind, text: r.kind }), el("td", { text: r.detail }),
        el("td", { text: r.ffn }),
        el("td", { class: "mono" }, r.function ? link("@" + r.function, () => { showTab("graph"); showFunction(r.function); }) : "—"),
        el("td", { class: "mono", text: summariseStates(r.states) || "—" }), el("td", { class: "num", text: num(r.parameters) })));
    }
    $("layer-stats").textContent = D.layers.length + " layers: " + Object.entries(kinds).map(([k, n]) => n + " " + k).join(", ") +
      " · " + count(total) + " parameters in layers";
  }

  // --------------------------------------------------------------------------------------------------- routes
  let routing = false;
  function setHash(h) {
    if (routing) return;
    if (location.hash !== "#" + h) history.replaceState(null, "", "#" + h);
  }
  function route() {
    const [tab, a, b] = decodeURIComponent(location.hash.slice(1)).split("/");
    routing = true;
    try {
      if (tab === "graph") { showTab("graph"); showFunction(a || D.functions[0].name, b); }
      else if (tab === "module") { showTab("module"); module(a ? [Number(a)] : []); }
      else if (tab === "params" || tab === "layers") showTab(tab);
      else { showTab("pipeline"); showStage(a !== undefined && D.stages[Number(a)] ? Number(a) : stage); }
    } finally { routing = false; }
  }

  header();
  stages();
  functions();
  canvasEvents();
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      const t = b.dataset.tab;
      showTab(t);
      if (t === "pipeline") showStage(stage);
      else if (t === "graph") setHash("graph/" + fn.name + (selected ? "/" + selected : ""));
      else setHash(t);
    });
  }
  route();
  window.addEventListener("hashchange", route);
  // for scripts and tests: the same actions as the clicks
  window.mlxcExplorer = { data: D, showTab: showTab, showStage: showStage, showFunction: showFunction, select: select, openModule: openModule, fit: fit };
})();
