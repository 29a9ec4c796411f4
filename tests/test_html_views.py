"""The HTML views in a real headless browser (Chromium driven by Playwright): they load with no console
errors and respond to clicks and hovers. Skipped without playwright or a Chromium (apt-get install chromium)."""

import json
import shutil

import pytest
import torch

from spartan_cli.circuit import Graph, select
from spartan_cli.measure.html import circuit_html
from tests.test_cli_sparsify import run_cli

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium")]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"network request {r.url}") if not r.url.startswith("file:") else None)
    page.goto(path.as_uri())
    return page, errors


def test_attention_page_draws_the_chosen_head_and_highlights_a_token(browser, tiny_gpt2_dir, tmp_path, capsys):
    page_file = tmp_path / "attention.html"
    code, _, err = run_cli(["density", str(tiny_gpt2_dir), "--prompt", "the cat sat on the mat and the dog ran",
                            "--html", str(page_file), "--gate-bias", "0", "--quiet"], capsys)
    assert code == 0, err
    text = page_file.read_text()
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text  # no network
    data = json.loads(text.split('id="data">', 1)[1].split("</script>", 1)[0])
    page, errors = _open(browser, page_file)
    buttons = page.locator("#heads button")
    assert buttons.count() == data["n_layers"] * data["n_heads"]
    first = data["first"]
    assert page.locator("#heads button.selected").get_attribute("data-head") == first
    assert page.locator("#sparse line.edge").count() == len(data["sparse"][first])
    assert page.locator("#dense line.edge").count() == len(data["dense"][first])
    other = next(n for n in data["sparse"] if len(data["sparse"][n]) != len(data["sparse"][first]))
    page.locator(f'#heads button[data-head="{other}"]').click()
    assert page.locator("#sparse line.edge").count() == len(data["sparse"][other])  # the click redrew the head
    assert other in page.locator("#selected").inner_text()
    q = max(q for q, _, _ in data["sparse"][other])
    page.locator(f'#sparse text[data-side="q"][data-pos="{q}"]').hover()
    lit = page.locator("#sparse line.edge.hl").count()
    assert lit == sum(1 for e in data["sparse"][other] if e[0] == q) and lit > 0
    page.screenshot(path=str(tmp_path / "attention.png"))
    assert (tmp_path / "attention.png").stat().st_size > 10_000
    assert errors == []


def test_circuit_page_draws_both_circuits_and_a_click_isolates_a_node(browser, tmp_path):
    g = Graph.from_shape(2, 3)
    scored = g.with_scores(torch.randn(g.real.shape, generator=torch.Generator().manual_seed(0)))
    sparse, dense = select(scored, 8, how="topn"), select(scored, 20, how="topn")
    path = tmp_path / "circuit.html"
    path.write_text(circuit_html([("sparse m", sparse, 0.91), ("dense m", dense, 0.9)], title="t"))
    page, errors = _open(browser, path)
    assert page.locator("#circuit0 line.edge").count() == sparse.n_edges
    assert page.locator("#circuit1 line.edge").count() == dense.n_edges
    assert page.locator("#circuit0 .node").count() == sparse.n_nodes
    node = next(e.child for e in dense.edges(in_graph_only=True) if e.child != "logits")
    page.locator(f'#circuit1 .node[data-name="{node}"]').click()
    touching = sum(1 for e in dense.edges(in_graph_only=True) if node in (e.parent, e.child))
    assert page.locator("#circuit1 line.edge.hl").count() == touching
    assert page.locator("#circuit1 line.edge.dim").count() == dense.n_edges - touching
    page.locator(f'#circuit1 .node[data-name="{node}"]').click()  # again: everything back
    assert page.locator("#circuit1 line.edge.dim").count() == 0
    page.screenshot(path=str(tmp_path / "circuit.png"))
    assert errors == []
