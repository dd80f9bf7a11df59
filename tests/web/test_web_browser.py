"""The dashboard in headless Debian Chromium (driven by Playwright, never `playwright install`), on a
real stack: a wrong token is refused with the gateway's reason, sign-in, a pipeline seen finishing live
(over SSE, no reload), its comparison sorted and its Pareto plot clicked, a cancelled pipeline said so;
screenshots in light and dark to /tmp for a person to look at."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from support.chromium import FLAGS, chromium_binary
from web_client import MODEL, sse_events

playwright = pytest.importorskip("playwright.sync_api")
expect = playwright.expect

pytestmark = [pytest.mark.browser, pytest.mark.integration]
SHOTS = "/tmp/tailor-web-{}.png"
WAIT_MS = 300_000  # a pipeline on a loaded 2-core machine


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_binary(), args=list(FLAGS))
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web_stack):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(web_stack.web_url)
    yield page
    context.close()
    # A blocked script (CSP), a failed call or an exception shows up here. The 400 and 401 that the tests
    # provoke (an invalid spec, a wrong token) are the browser's own report of a refused request, expected.
    provoked = ("status of 400", "status of 401")
    assert not [p for p in problems if not any(code in p for code in provoked)], problems


def sign_in(page, token: str) -> None:
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def test_a_wrong_token_is_refused_with_the_gateways_reason(page, web_stack):
    # By keyboard alone: the page puts the focus in the token field; Enter submits.
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type("tlr_not-a-real-token")
    page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "did not accept this token" in alert.inner_text() and "UNAUTHENTICATED" in alert.inner_text()
    assert page.locator("#view-sign-in").is_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_sign_in_submit_from_the_page_watch_it_finish_live_and_compare(page, web_stack, quick_spec):
    sign_in(page, web_stack.token)
    page.get_by_role("heading", name="Your project").wait_for()
    assert web_stack.token not in page.url
    spec = page.get_by_label("Spec (YAML")
    # A config the method does not have: refused before anything runs, with the gateway's reason.
    spec.fill(quick_spec("web-typo", quantize=[{"method": "rtn", "config": {"bitz": 4}}]))
    page.get_by_role("button", name="Validate").click()
    expect(page.get_by_role("alert")).to_contain_text("The spec was refused")
    expect(page.get_by_role("alert")).to_contain_text("bitz")
    expect(page.get_by_role("alert")).to_contain_text("INVALID_ARGUMENT")
    spec.fill(quick_spec("web-browser"))
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#spec-said")).to_contain_text("Valid: it would run")
    expect(page.get_by_role("alert")).to_be_hidden()
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url("**/#/pipelines/*")
    created = {"id": page.url.rsplit("/", 1)[1]}
    # Every state the page shows, recorded as the live stream changes it (no reload happens).
    page.evaluate(
        """() => { window.seen = [document.getElementById('pipeline-state').textContent];
        new MutationObserver(() => window.seen.push(document.getElementById('pipeline-state').textContent))
          .observe(document.getElementById('pipeline-state'), {childList: true, characterData: true, subtree: true}); }"""
    )
    expect(page.locator("#pipeline-state")).to_have_text("succeeded", timeout=WAIT_MS)
    seen = [s for s in page.evaluate("window.seen") if s]
    assert seen[-1] == "succeeded" and seen[0] in ("pending", "running"), seen
    assert page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert created["id"] in page.url and web_stack.token not in page.url
    assert page.get_by_role("button", name="Cancel pipeline").is_disabled()

    table = page.locator("#candidates")
    table.wait_for()
    names = table.locator("tbody th").all_inner_texts()
    assert set(names) >= {"original", "bf16"}, names
    page.locator("#candidates thead button", has_text="size_mb").focus()
    page.keyboard.press("Enter")  # sorting is a button: the keyboard reaches it as the mouse does
    header = page.locator("#candidates thead th", has_text="size_mb")
    assert header.get_attribute("aria-sort") == "ascending"
    column = table.locator("thead th").all_inner_texts().index("size_mb") + 1
    sizes = [float(t) for t in table.locator(f"tbody tr > :nth-child({column})").all_inner_texts()]
    page.locator("#candidates thead button", has_text="size_mb").click()
    assert header.get_attribute("aria-sort") == "descending"

    # The plot is Chart.js's, with every candidate that has both metrics as a point; a click selects one.
    points = page.evaluate("Chart.getChart(document.getElementById('pareto')).data.datasets[0].data.length")
    assert points == len(names)
    page.locator("#pareto").scroll_into_view_if_needed()
    box = page.evaluate(
        """() => { const c = Chart.getChart(document.getElementById('pareto'));
        const p = c.getDatasetMeta(0).data[0]; const r = c.canvas.getBoundingClientRect();
        return {x: r.left + p.x, y: r.top + p.y, name: c.data.datasets[0].data[0].name}; }"""
    )
    page.mouse.click(box["x"], box["y"])
    # Chart.js handles pointer events on the next animation frame: the text is waited for, not read at once.
    expect(page.locator("#selected")).to_contain_text(f"Selected: {box['name']}")
    page.screenshot(path=SHOTS.format("pipeline-light"), full_page=True)
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=SHOTS.format("pipeline-dark"), full_page=True)
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 18, 22)"

    # The switch overrides the system: light again, though the system says dark.
    page.get_by_role("button", name="Theme: system").click()
    assert page.evaluate("document.documentElement.dataset.theme") == "light"
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    assert sorted(sizes) == sizes

    page.get_by_role("link", name="Pipelines and artifacts").click()
    page.get_by_role("heading", name="Artifacts").wait_for()
    page.locator("#artifacts tbody tr").first.wait_for()
    page.emulate_media(color_scheme="light")
    page.screenshot(path=SHOTS.format("home-light"), full_page=True)


def test_cancel_from_the_page_says_cancelled(page, web_stack, submit):
    sign_in(page, web_stack.token)
    page.get_by_role("heading", name="Your project").wait_for()
    created = submit("web-cancel")  # tens of seconds of work: cancelled well before it ends
    page.goto(f"{web_stack.web_url}#/pipelines/{created['id']}")
    page.get_by_role("button", name="Cancel pipeline").click()
    expect(page.locator("#pipeline-state")).to_have_text("cancelled", timeout=WAIT_MS)
    assert page.get_by_role("button", name="Cancel pipeline").is_disabled()
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=SHOTS.format("cancelled-dark"), full_page=True)
    page.goto(web_stack.web_url)
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("API token").wait_for()
    page.screenshot(path=SHOTS.format("sign-in-dark"))


AXE = Path(__file__).parent / "vendor" / "axe.min.js"  # axe-core 4.14.1 (MPL-2.0), vendored for the tests


def test_no_serious_accessibility_violation_on_any_page_in_either_theme(browser, web_stack, http, submit):
    """axe-core's WCAG 2.1 A/AA rules on the sign-in, project and pipeline pages (with the comparison),
    light and dark. The page's CSP forbids injected scripts, so this context bypasses it (the other tests
    keep it)."""
    created = submit("web-axe")
    assert sse_events(http, web_stack.token, created["id"])[-1] == ("end", {})
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, bypass_csp=True)
    page = context.new_page()
    found = {}
    try:
        for scheme in ("light", "dark"):
            page.emulate_media(color_scheme=scheme)
            page.goto(web_stack.web_url)
            page.get_by_label("API token").wait_for()
            found[f"sign-in {scheme}"] = _axe(page)
            sign_in(page, web_stack.token)
            page.locator("#artifacts tbody tr").first.wait_for()
            found[f"home {scheme}"] = _axe(page)
            page.goto(f"{web_stack.web_url}#/pipelines/{created['id']}")
            page.locator("#candidates tbody tr").first.wait_for()
            found[f"pipeline {scheme}"] = _axe(page)
            page.get_by_role("button", name="Sign out").click()
    finally:
        context.close()
    serious = {view: v for view, v in found.items() if v}
    assert not serious, json.dumps(serious, indent=1)


def _axe(page) -> list[dict]:
    """axe's serious and critical violations on the page as it is now (it checked something: rules passed)."""
    page.add_script_tag(path=str(AXE))
    result = page.evaluate(
        """async () => { const r = await axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']});
        return {passes: r.passes.length, violations: r.violations
          .filter(v => v.impact === 'serious' || v.impact === 'critical')
          .map(v => ({id: v.id, help: v.help, nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))}; }"""
    )
    assert result["passes"] > 5, result
    return result["violations"]


def test_upload_the_bundled_model_from_the_page_and_download_it_checked(page, web_stack, inputs, tmp_path):
    sign_in(page, web_stack.token)
    page.get_by_role("heading", name="Your project").wait_for()
    files = sorted(str(p) for p in MODEL.iterdir() if p.is_file())
    page.get_by_label("Files").set_input_files(files)
    page.get_by_label("Name").fill("stories260K")  # the name is in the manifest, so in the id
    page.get_by_role("button", name="Upload", exact=True).click()
    model_id = inputs["model"]["artifact"]["id"]  # the same bytes uploaded over the API: the same id
    expect(page.locator("#upload-said")).to_contain_text(
        f"Uploaded stories260K: artifact {model_id}", timeout=60_000
    )
    assert page.locator("#upload-progress").evaluate("bar => bar.value") == 100

    with page.expect_download() as caught:
        page.get_by_role("button", name="Download stories260K as a tar file").first.click()
    archive = tmp_path / "model.tar"
    caught.value.save_as(archive)
    manifest = json.loads(inputs["model"]["manifest_json"])
    with tarfile.open(archive) as tar:
        got = {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest() for m in tar.getmembers()}
    assert got == {f["path"]: f["sha256"] for f in manifest["files"]}
    page.screenshot(path=SHOTS.format("uploaded-light"), full_page=True)
