"""The report in a browser: headless Chromium opens the page built from synthetic results (test_report_build's) and
checks what a reader meets: every image loads, the console stays quiet, the tables fit a laptop's screen and the
method descriptions are shown.

Needs Debian's headless Chromium, ``apt-get install -y chromium``; skipped where it is not installed (CI may not
have it). Plain command-line flags, no new Python dependency: ``--dump-dom`` of a copy of the page with a probe
script appended (it measures the laid-out page and writes the numbers into the DOM), ``--enable-logging=stderr
--v=0`` for the console, and ``--screenshot`` at the laptop size.
"""

import html
import json
import re
import shutil
import subprocess

import pytest

from test_report_build import build_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1366, 900  # a laptop's screen
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Run once the page and its images have loaded: records which images decoded and whether each method description
# takes space, then opens every <details> (folded tables must fit too) and measures the page and its tables.
PROBE = """<script>
window.addEventListener("load", () => {
  const descriptions = [...document.querySelectorAll("dl.methods dd")].map(dd => dd.getClientRects().length > 0);
  document.querySelectorAll("details").forEach(details => { details.open = true; });
  const probe = {
    images: [...document.images].map(image => [image.getAttribute("src"), image.complete && image.naturalWidth > 0]),
    descriptions, viewport: window.innerWidth, page: document.documentElement.scrollWidth,
    tables: [...document.querySelectorAll("table")].map(table => table.getBoundingClientRect().right),
  };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(probe);
  document.body.append(out);
});
</script>"""

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                                         "(Debian: apt-get install -y chromium)")


def chromium(profile, *args) -> subprocess.CompletedProcess:
    """Headless Chromium at the laptop size with its own profile; the console is logged to stderr. No sandbox: test
    machines and containers run as root, where Chromium refuses to start with one."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={WIDTH},{HEIGHT}",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder, _, _ = build_page(tmp_path_factory.mktemp("browser"), monkeypatch)
    return folder


@pytest.fixture(scope="module")
def opened(report, tmp_path_factory):
    """The probe's measurements of the page, and the console messages Chromium logged while loading it."""
    probed = report / "probed.html"  # beside index.html, so that its relative links resolve the same
    probed.write_text((report / "index.html").read_text().replace("</body>", f"{PROBE}\n</body>"))
    run = chromium(tmp_path_factory.mktemp("profile"), "--dump-dom", probed.as_uri())
    probe = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S).group(1)))
    return probe, re.findall(r"CONSOLE\S*\] (.*)", run.stderr)


def test_every_image_loads(report, opened):
    probe, _ = opened
    assert probe["images"] and [src for src, loaded in probe["images"] if not loaded] == []
    for src, _ in probe["images"]:
        assert (report / src).read_bytes().startswith(PNG_MAGIC), src
        assert "</svg>" in (report / src).with_suffix(".svg").read_text(), src  # each figure links its SVG


def test_the_console_stays_quiet(opened):
    _, console = opened
    assert console == []


def test_tables_fit_a_laptop_screen(opened):
    probe, _ = opened
    assert probe["viewport"] == WIDTH and probe["tables"]
    assert probe["page"] <= WIDTH  # no sideways scrolling of the page: a wide table scrolls inside itself
    assert max(probe["tables"]) <= WIDTH


def test_method_descriptions_are_shown(opened):
    probe, _ = opened
    assert probe["descriptions"] and all(probe["descriptions"])


def test_the_page_renders_at_laptop_width(report, tmp_path):
    shot = tmp_path / "report.png"
    chromium(tmp_path / "profile", f"--screenshot={shot}", (report / "index.html").as_uri())
    png = shot.read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (WIDTH, HEIGHT)  # IHDR
