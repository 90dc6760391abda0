// pfengine genealogy page: hover a node for its step, click it for its whole text and lineage.
// Model text is untrusted: it only ever reaches the page through textContent.
(function () {
  "use strict";
  var FLAG_SCORED = 1, FLAG_FORKED = 2, FLAG_REFERENCE = 4, FLAG_CHOSEN = 8, FLAG_CARRIED = 16;
  var data = JSON.parse(document.getElementById("pf-data").textContent);
  var circles = document.querySelectorAll("#pf-nodes > circle");
  var paths = document.querySelectorAll("#pf-edges > path");
  var tip = document.getElementById("pf-tip");
  var info = document.getElementById("pf-info");
  var edgeOf = [];  // node -> the path drawn from its parent (roots have none)
  var indexOf = new Map();
  var selected = [];

  var e = 0;
  data.nodes.forEach(function (node, i) {
    indexOf.set(circles[i], i);
    edgeOf.push(node[0] < 0 ? null : paths[e++]);
  });

  function field(i, k) { return data.nodes[i][k]; }
  function lineage(i) {
    var path = [];
    for (; i >= 0; i = field(i, 0)) path.push(i);
    return path.reverse();
  }
  function stepText(i) { return data.steps[field(i, 5)]; }
  function where(i) {
    var col = data.columns[field(i, 1)];
    if (col[1] === 0) return "prompt" + (data.method === "particle_gibbs" ? " (sweep " + (col[0] + 1) + ")" : "");
    return "round " + col[1] + (data.method === "particle_gibbs" ? ", sweep " + (col[0] + 1) : "");
  }
  function summary(i) {
    if (field(i, 0) < 0) return where(i);
    return where(i) + " · ×" + field(i, 2) + " · score " + field(i, 3).toFixed(3) + " · weight " +
      field(i, 4).toPrecision(3);
  }

  function showTip(i, event) {
    var text = stepText(i).replace(/\s+$/, "");
    if (field(i, 0) < 0) text = data.prompt;
    else if (field(i, 6) & FLAG_CARRIED) text = "(finished; carried on unchanged)";
    tip.textContent = summary(i) + "\n" + text;
    tip.hidden = false;
    var x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
    var y = Math.min(event.clientY + 14, window.innerHeight - tip.offsetHeight - 8);
    tip.style.left = Math.max(4, x) + "px";
    tip.style.top = Math.max(4, y) + "px";
  }

  function add(list, term, value) {
    var dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    list.appendChild(dt);
    list.appendChild(dd);
  }
  function block(title, text) {
    var h = document.createElement("div"), pre = document.createElement("pre");
    h.textContent = title;
    pre.textContent = text;
    info.appendChild(h);
    info.appendChild(pre);
  }

  function describe(i) {
    info.textContent = "";
    var close = document.createElement("button");
    close.type = "button";
    close.textContent = "×";
    close.addEventListener("click", clear);
    info.appendChild(close);
    var h = document.createElement("h2");
    h.textContent = where(i);
    info.appendChild(h);
    var flags = field(i, 6), list = document.createElement("dl");
    if (field(i, 0) >= 0) {
      add(list, "copies", field(i, 2) + " (particle" + (field(i, 2) > 1 ? "s " : " ") + field(i, 8).join(", ") + ")");
      add(list, "PRM score", (flags & FLAG_SCORED ? "" : "not scored this round; ") + field(i, 3).toFixed(4));
      add(list, "weight", field(i, 4).toPrecision(4) + " (of the round's total 1)");
      var col = data.columns[field(i, 1)];
      add(list, "round's ESS", col[2] + " of " + data.n + (col[3] ? "; resampled after this round" : ""));
      var notes = [];
      if (flags & FLAG_FORKED) notes.push("forked: resampling copied its parent more than once");
      if (flags & FLAG_CARRIED) notes.push("finished, carried on");
      if (flags & FLAG_REFERENCE) notes.push("reference trajectory");
      if (flags & FLAG_CHOSEN) notes.push("on the chosen path");
      if (notes.length) add(list, "", notes.join("; "));
      var c = field(i, 7);
      if (c >= 0) {
        var cand = data.candidates[c], verdict = cand[1] === null ? "" : cand[1] ? " (correct)" : " (wrong)";
        add(list, "candidate " + c + (c === data.best ? ", chosen" : ""),
            "answer " + (cand[0] === null ? "none" : cand[0]) + verdict);
      }
    }
    info.appendChild(list);
    if (field(i, 0) >= 0) {
      block("this round's step", stepText(i).replace(/\s+$/, ""));
      block("text so far", lineage(i).map(stepText).join(""));
    }
    if (data.prompt) block("prompt", data.prompt);
    info.hidden = false;
  }

  // The selected node's lineage: its circles ringed, its edges drawn again above the chosen path.
  var trail = document.createElementNS("http://www.w3.org/2000/svg", "path");
  trail.setAttribute("class", "trail");
  document.getElementById("pf-nodes").before(trail);

  function clear() {
    selected.forEach(function (el) { el.classList.remove("sel"); });
    selected = [];
    trail.setAttribute("d", "");
    info.hidden = true;
  }

  function select(i) {
    clear();
    var path = lineage(i);
    selected = path.map(function (j) { return circles[j]; });
    selected.forEach(function (el) { el.classList.add("sel"); });
    trail.setAttribute("d", path.filter(function (j) { return edgeOf[j]; }).map(function (j) {
      return edgeOf[j].getAttribute("d");
    }).join(""));
    describe(i);
    history.replaceState(null, "", "#node=" + i);
  }

  var svg = document.getElementById("pf-svg");
  svg.addEventListener("mousemove", function (event) {
    var i = indexOf.get(event.target);
    if (i === undefined) tip.hidden = true;
    else showTip(i, event);
  });
  svg.addEventListener("mouseleave", function () { tip.hidden = true; });
  svg.addEventListener("click", function (event) {
    var i = indexOf.get(event.target);
    if (i === undefined) clear();
    else select(i);
  });
  document.addEventListener("keydown", function (event) { if (event.key === "Escape") clear(); });

  var wanted = /^#node=(\d+)$/.exec(location.hash);
  if (wanted && Number(wanted[1]) < data.nodes.length) select(Number(wanted[1]));

  var status = document.getElementById("pf-status");
  status.setAttribute("data-nodes", String(circles.length));
  status.setAttribute("data-edges", String(paths.length));
  status.setAttribute("data-state", "ready");
  status.setAttribute("data-ms", String(Math.round(performance.now())));
  // Style and layout now rather than before the first paint (the browser does them once either way):
  // data-layout-ms is when the page is ready to paint, for bench/genealogy.py.
  svg.getBoundingClientRect();
  status.setAttribute("data-layout-ms", String(Math.round(performance.now())));
  status.textContent = circles.length + " nodes, " + paths.length + " edges (" + data.nodes.length + " in the data)";
})();
