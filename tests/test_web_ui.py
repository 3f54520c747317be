"""The web UI in a real browser: Debian's Chromium, driven by Playwright, against a real
`hearth run` with the echo backend and real models (SmolLM2, whisper-base, a tiny Stable
Diffusion, a Piper voice where espeak-ng is installed, a gallery served over HTTP).

Screenshots of every page go to test-artifacts/ui/ (gitignored): look at them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CACHE, ROOT, Gateway, link_tree, wait_until, write_model
from tests.fileserver import FileServer, Served

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
Browser = sync_api.Browser
Page = sync_api.Page
expect = sync_api.expect

pytestmark = pytest.mark.real_model
# A loaded 2-core CI machine starts models and pages slower than a desk: wait up to 20 s.
expect.set_options(timeout=20_000)

ARTIFACTS = ROOT / "test-artifacts" / "ui"
FOX = "The quick brown fox jumps over the lazy dog"
INFERENCE_KEY = "household-key-0123456789"
ADMIN_KEY = "admin-key-0123456789abcdef"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed and `make test` could not install it (apt-get)")
    return path


def speak_fox(directory: Path) -> Path | None:
    """The fox sentence as a WAV made by espeak-ng (None without espeak-ng)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return None
    path = directory / "fox.wav"
    subprocess.run([espeak, "-w", str(path), FOX], check=True)
    return path


@pytest.fixture(scope="module")
def speech_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


@pytest.fixture(scope="module")
def fox_wav(speech_dir: Path) -> Path:
    path = speech_dir / "fox.wav"
    if not path.exists():
        pytest.skip("espeak-ng is not installed and `make test` could not install it (apt-get)")
    return path


@pytest.fixture(scope="module")
def browser(speech_dir: Path) -> Iterator[Browser]:
    # The microphone is a fake device that plays the fox sentence, and the permission prompt
    # is answered yes: the Record button is tested as a person would use it.
    flags = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    spoken = speak_fox(speech_dir)
    if spoken is not None:
        flags.append(f"--use-file-for-fake-audio-capture={spoken}")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=flags)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def gallery_server(tiny_gguf: Path) -> Iterator[tuple[FileServer, bytes]]:
    server = FileServer().start()
    # Eight copies with a pause per 64 KiB: the download takes a few seconds, so the bar is
    # seen moving (llama.cpp reads the first copy and ignores the rest).
    data = tiny_gguf.read_bytes() * 8
    server.files["/tiny.gguf"] = Served(data, delay=0.03)
    yield server, data
    server.stop()


@pytest.fixture(scope="module")
def ui_models(
    tmp_path_factory: pytest.TempPathFactory,
    real_models: Path,
    tiny_sd: Path,
    gallery_server: tuple[FileServer, bytes],
) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("ui-models")
    write_model(directory, "echo", "backend: echo\noptions: {latency_ms: 60}")
    link_tree(real_models / "smollm2-135m-instruct", directory / "smollm2-135m-instruct")
    shutil.copy(real_models / "smollm2-135m-instruct.yaml", directory)
    link_tree(real_models / "whisper-base", directory / "whisper-base")
    write_model(directory, "whisper-base", "backend: whisper\nmodel: whisper-base")
    link_tree(tiny_sd, directory / "tiny-sd")
    sd = "backend: diffusers\nmodel: tiny-sd\noptions: {steps: 2, max_size: 256}"
    write_model(directory, "tiny-sd", sd)
    if shutil.which("espeak-ng") is not None:  # the Piper backend needs it
        from gateway.gallery import install_named

        install_named(["joe-us-piper"], CACHE)
        link_tree(CACHE / "joe-us-piper", directory / "joe-us-piper")
        shutil.copy(CACHE / "joe-us-piper.yaml", directory)
    server, data = gallery_server
    index = directory.parent / "gallery.yaml"
    index.write_text(
        "entries:\n"
        "  - name: tiny-story\n"
        "    description: A tiny random llama, for tests\n"
        "    model: tiny.gguf\n"
        "    config: {backend: llama, context_size: 256}\n"
        "    files:\n"
        "      - filename: tiny.gguf\n"
        f'        sha256: "{hashlib.sha256(data).hexdigest()}"\n'
        f"        size: {len(data)}\n"
        f"        uri: {server.url}/tiny.gguf\n"
        "  - name: huge-model\n"
        "    description: More than this machine has\n"
        "    model: huge.gguf\n"
        "    config: {backend: llama}\n"
        "    files:\n"
        "      - filename: huge.gguf\n"
        f'        sha256: "{"0" * 64}"\n'
        "        size: 900000000000000\n"
        f"        uri: {server.url}/huge.gguf\n"
    )
    return directory, index


@pytest.fixture(scope="module")
def ui_gateway(ui_models: tuple[Path, Path]) -> Iterator[Gateway]:
    directory, index = ui_models
    gateway = Gateway(directory, env={"HEARTH_GALLERY": str(index)}).start()
    yield gateway
    gateway.cleanup()


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    directory = tmp_path_factory.mktemp("ui-keyed")
    write_model(directory, "echo", "backend: echo")
    env = {"HEARTH_API_KEYS": INFERENCE_KEY, "HEARTH_ADMIN_KEYS": ADMIN_KEY}
    gateway = Gateway(directory, env=env).start()
    yield gateway
    gateway.cleanup()


class Problems:
    """What the page said went wrong: script errors and refused loads (CSP violations)."""

    def __init__(self, page: Page) -> None:
        self.messages: list[str] = []
        page.on("pageerror", lambda error: self.messages.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message: object) -> None:
        text = message.text  # type: ignore[attr-defined]
        if message.type == "error" and "status of 401" not in text:  # type: ignore[attr-defined]
            self.messages.append(text)


def open_page(
    browser: Browser, gateway: Gateway, area: str = "chat", viewport: dict[str, int] = LAPTOP
) -> tuple[Page, Problems]:
    context = browser.new_context(base_url=gateway.url, viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    problems = Problems(page)
    page.goto(f"/#/{area}")
    return page, problems


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far: the work a backend has done."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def backend_row(gateway: Gateway, model: str) -> dict:
    rows = httpx.get(f"{gateway.url}/backends").json()["data"]
    return next(row for row in rows if row["model"] == model)


def send(page: Page, model: str, message: str) -> sync_api.Locator:
    chat = page.locator("section#chat")
    chat.get_by_label("Model").select_option(model)
    chat.get_by_label("Message").fill(message)
    chat.get_by_role("button", name="Send").click()
    return chat.locator("li.message.assistant").last


def test_the_page_streams_an_answer_as_markdown_with_its_speed(
    browser: Browser, ui_gateway: Gateway
) -> None:
    page, problems = open_page(browser, ui_gateway)
    chat = page.locator("section#chat")
    expect(chat.get_by_label("Model").locator("option", has_text="echo")).to_have_count(1)
    options = chat.get_by_label("Model").locator("option").all_inner_texts()
    assert "echo" in options
    assert "smollm2-135m-instruct" in options
    assert not {"whisper-base", "tiny-sd"} & set(options), "chat models only"
    words = " ".join(f"word{i}" for i in range(30))
    # Echo says the message back, word by word: markdown, and HTML that must stay text.
    markdown = "# Title\n\n**bold** and `code`\n\n```python\nprint(1)\n```\n\n"
    links = "[docs](https://example.org/a) [x](javascript:alert(1)) [y](data:text/html,z)\n\n"
    message = f"{markdown}{links}<img src=x onerror=alert(1)> {words}"
    answer = send(page, "echo", message)
    content = answer.locator(".content")
    expect(content).to_contain_text("word1 ")
    assert answer.get_attribute("aria-busy") == "true"
    assert "word29" not in content.inner_text(), "the text appears while it is streamed"
    expect(answer.locator(".stats")).to_contain_text("tok/s", timeout=15_000)
    stats = answer.locator(".stats").inner_text()
    assert re.search(r"[\d.]+ tok/s · TTFT \d+ ms · \d+ tokens", stats), stats
    assert answer.get_attribute("aria-busy") != "true"
    assert content.locator("h1").inner_text() == "Title"
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("pre code").inner_text().strip() == "print(1)"
    assert content.locator("img").count() == 0, "model output never becomes HTML"
    hrefs = content.locator("a").evaluate_all("links => links.map(a => [a.href, a.rel])")
    assert hrefs == [["https://example.org/a", "noopener noreferrer"]], "only web links"
    assert "<img src=x onerror=alert(1)>" in content.inner_text()
    assert problems.messages == []
    shoot(page, "chat")
    # The conversation is kept in the browser: it is there after a reload.
    page.reload()
    expect(page.locator("section#chat li.message.assistant .content h1")).to_have_text("Title")
    page.context.close()


def test_stop_ends_the_generation_in_the_backend(browser: Browser, ui_gateway: Gateway) -> None:
    page, problems = open_page(browser, ui_gateway)
    chat = page.locator("section#chat")
    chat.locator("details summary").click()
    chat.get_by_label("Max tokens").fill("4000")
    # Greedy, SmolLM2 tells this story for minutes (measured: past 300 s, 4000 tokens).
    chat.get_by_label("Temperature").fill("0")
    answer = send(page, "smollm2-135m-instruct", "Tell me a very long story about a dragon.")
    # The first answer loads the model first.
    expect(answer.locator(".content")).to_contain_text(re.compile(r"\w+ \w+ \w+"), timeout=60_000)
    expect(chat.get_by_role("button", name="Stop")).to_be_enabled()
    pid = backend_row(ui_gateway, "smollm2-135m-instruct")["pid"]
    before = cpu_seconds(pid)
    time.sleep(0.5)
    assert cpu_seconds(pid) - before > 0.2, "the backend works while the answer streams"
    chat.get_by_role("button", name="Stop").click()
    expect(answer.locator(".stats")).to_contain_text("stopped")
    assert wait_until(
        lambda: backend_row(ui_gateway, "smollm2-135m-instruct")["requests"]["in_flight"] == 0
    )
    text = answer.locator(".content").inner_text()
    time.sleep(0.3)
    settled = cpu_seconds(pid)
    time.sleep(1.0)
    assert cpu_seconds(pid) - settled < 0.05, "the backend stopped working when Stop was pressed"
    assert answer.locator(".content").inner_text() == text
    expect(chat.get_by_role("button", name="Stop")).to_be_disabled()
    expect(answer.get_by_role("button", name="Copy")).to_be_visible()
    assert problems.messages == []
    page.context.close()


def test_stop_on_echo_cancels_its_stream(browser: Browser, ui_gateway: Gateway) -> None:
    page, _ = open_page(browser, ui_gateway)
    before = ui_gateway.log().count("stream cancelled after")
    answer = send(page, "echo", " ".join(f"w{i}" for i in range(200)))
    expect(answer.locator(".content")).to_contain_text("w3 ")
    page.locator("section#chat").get_by_role("button", name="Stop").click()
    assert wait_until(lambda: ui_gateway.log().count("stream cancelled after") > before, 5)
    expect(answer.locator(".stats")).to_contain_text("stopped")
    # Regenerate asks again with the same conversation.
    answer.get_by_role("button", name="Regenerate").click()
    fresh = page.locator("section#chat li.message.assistant").last
    expect(fresh.locator(".content")).to_contain_text("w5 ")
    expect(page.locator("section#chat li.message.assistant")).to_have_count(1)
    page.locator("section#chat").get_by_role("button", name="Stop").click()
    page.context.close()


def test_speech_from_a_file_and_from_the_microphone(
    browser: Browser, ui_gateway: Gateway, fox_wav: Path
) -> None:
    page, problems = open_page(browser, ui_gateway, "speech")
    speech = page.locator("section#speech")
    speech.get_by_label("Model", exact=True).select_option("whisper-base")
    speech.get_by_label("Audio file").set_input_files(str(fox_wav))
    speech.get_by_role("button", name="Transcribe").click()
    transcript = page.locator("output#transcript")
    expect(transcript).to_contain_text("brown fox", ignore_case=True, timeout=60_000)
    shoot(page, "speech")
    # The fake microphone plays the same sentence, over and over.
    speech.get_by_role("button", name="Record").click()
    page.wait_for_timeout(4000)
    speech.get_by_role("button", name="Stop recording").click()
    expect(transcript).not_to_contain_text("brown fox", ignore_case=True, timeout=5_000)
    expect(transcript).to_contain_text("fox", ignore_case=True, timeout=60_000)
    assert problems.messages == []
    page.context.close()


def is_mp3(data: bytes) -> bool:
    """An ID3 tag, or an MPEG audio frame's sync word."""
    return data[:3] == b"ID3" or (data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def test_text_is_read_aloud_and_can_be_downloaded(browser: Browser, ui_gateway: Gateway) -> None:
    if not (ui_gateway.models_dir / "joe-us-piper.yaml").exists():
        pytest.skip("espeak-ng is not installed and `make test` could not install it (apt-get)")
    page, problems = open_page(browser, ui_gateway, "speech")
    card = page.locator("section#speech form#tts")
    expect(card.get_by_role("heading", name="Read aloud")).to_be_visible()
    card.get_by_label("Voice model").select_option("joe-us-piper")
    voice = card.get_by_label("Voice", exact=True)
    # Listing the voices starts the voice model.
    expect(voice.locator("option[value='joe']")).to_have_count(1, timeout=60_000)
    expect(voice).to_have_value("joe")
    assert "default" in voice.locator("option[value='joe']").inner_text()
    text = card.get_by_label("Text to speak")
    text.fill(f"{FOX}.")
    speed = card.get_by_label("Speed")
    # Out of range: said before anything is sent (the field does not clamp what is typed).
    speed.fill("9")
    card.get_by_role("button", name="Speak").click()
    expect(card.get_by_role("alert")).to_contain_text("0.25 to 4")
    speed.fill("1")
    card.get_by_role("button", name="Speak").click()
    audio = card.get_by_label("Spoken audio")
    expect(audio).to_have_attribute("src", re.compile(r"^blob:"), timeout=60_000)
    expect(card.get_by_role("alert")).to_be_hidden()
    # The duration is NaN (or Infinity) until the metadata is read; playing is not needed.
    duration = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        duration = audio.evaluate("el => Number.isFinite(el.duration) ? el.duration : null")
        if duration is not None:
            break
        time.sleep(0.1)
    assert duration is not None, "the audio's length was never known"
    assert 1.5 < duration < 6, f"the sentence takes about three seconds, not {duration}"
    with page.expect_download() as started:
        card.get_by_role("link", name="Download audio").click()
    assert started.value.suggested_filename == "hearth-speech.mp3"
    assert is_mp3(Path(started.value.path()).read_bytes())
    shoot(page, "speech-read-aloud")
    page.set_viewport_size(PHONE)  # the player and the link fit a phone too
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    shoot(page, "phone-speech-read-aloud")
    assert problems.messages == []
    page.context.close()


def test_an_image_is_drawn_and_can_be_downloaded(browser: Browser, ui_gateway: Gateway) -> None:
    page, problems = open_page(browser, ui_gateway, "images")
    images = page.locator("section#images")
    images.get_by_label("Prompt").fill("a lighthouse at dusk")
    images.get_by_label("Size").select_option("256x256")
    images.get_by_label("Steps").fill("2")
    images.get_by_label("Seed").fill("7")
    images.get_by_role("button", name="Generate").click()
    picture = images.get_by_role("img", name="a lighthouse at dusk")
    expect(picture).to_be_visible(timeout=120_000)
    assert picture.evaluate("img => [img.complete, img.naturalWidth]") == [True, 256]
    download = images.get_by_role("link", name="Download")
    with page.expect_download() as started:
        download.first.click()
    saved = started.value.path()
    assert Path(saved).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shoot(page, "images")
    assert problems.messages == []
    page.context.close()


def test_models_install_with_progress_unload_and_remove(
    browser: Browser, ui_gateway: Gateway
) -> None:
    httpx.post(
        f"{ui_gateway.url}/v1/chat/completions",
        json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]},
    ).raise_for_status()  # loaded, to be seen and unloaded
    page, problems = open_page(browser, ui_gateway, "models")
    models = page.locator("section#models")
    loaded = models.get_by_role("table", name="Loaded models")
    expect(loaded).to_contain_text("echo")
    gallery = models.get_by_role("list", name="Gallery")
    models.get_by_label("Search gallery").fill("tiny")
    expect(gallery.locator("li")).to_have_count(1)
    models.get_by_label("Search gallery").fill("no such thing")
    expect(gallery.locator("li")).to_have_count(0)
    models.get_by_label("Search gallery").fill("")
    entry = gallery.locator("li", has_text="tiny-story")
    expect(entry).to_contain_text("fits")
    expect(gallery.locator("li", has_text="huge-model")).to_contain_text("too big")
    entry.get_by_role("button", name="Install tiny-story").click()
    bar = entry.get_by_label("Installing tiny-story")
    expect(bar).to_be_visible()
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = bar.evaluate("bar => bar.isConnected ? [bar.value, bar.max] : null")
        if state is None:
            break
        seen.add(round(100 * state[0] / state[1]))
        if state[0] == state[1] and state[1] > 1:
            break
        time.sleep(0.05)
    assert 100 in seen, f"the bar reached 100 %: saw {sorted(seen)}"
    assert any(0 < percent < 100 for percent in seen), f"and moved: saw {sorted(seen)}"
    expect(entry).to_contain_text("installed", timeout=10_000)
    assert (ui_gateway.models_dir / "tiny-story.yaml").exists()
    expect(page.locator("section#chat").get_by_label("Model").locator("option")).to_contain_text(
        ["tiny-story"]
    )
    shoot(page, "models")
    # Unload what is loaded.
    loaded.get_by_role("button", name="Unload echo").click()
    expect(loaded).not_to_contain_text("echo", timeout=10_000)
    # Remove asks once more, then deletes the files.
    remove = entry.get_by_role("button", name="Remove tiny-story")
    remove.click()
    expect(remove).to_have_text("Confirm remove")
    remove.click()
    expect(entry.get_by_role("button", name="Install tiny-story")).to_be_visible(timeout=10_000)
    assert not (ui_gateway.models_dir / "tiny-story.yaml").exists()
    assert not (ui_gateway.models_dir / "tiny-story").exists()
    assert problems.messages == []
    page.context.close()


def test_on_a_phone_every_area_fits_the_screen(browser: Browser, ui_gateway: Gateway) -> None:
    page, problems = open_page(browser, ui_gateway, viewport=PHONE)
    for area in ("chat", "speech", "images", "models"):
        page.goto(f"/#/{area}")
        expect(page.locator(f"section#{area}")).to_be_visible()
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"{area}: the page scrolls sideways ({width} px)"
        shoot(page, f"phone-{area}")
    assert problems.messages == []
    page.context.close()


def test_keys_are_asked_for_and_admin_parts_need_an_admin_key(
    browser: Browser, keyed_gateway: Gateway
) -> None:
    page, problems = open_page(browser, keyed_gateway)
    key = page.get_by_label("API key")
    expect(key).to_be_visible()
    shoot(page, "key")
    key.fill("not-the-key-0123456789")
    page.get_by_role("button", name="Use key").click()
    expect(page.get_by_role("alert")).to_contain_text("refused")
    assert page.evaluate("localStorage.getItem('hearth.key')") is None
    key.fill(INFERENCE_KEY)
    page.get_by_role("button", name="Use key").click()
    nav = page.get_by_role("navigation")
    expect(nav.get_by_role("link", name="Chat")).to_be_visible()
    expect(nav.get_by_role("link", name="Models")).to_have_count(0)
    assert page.locator("section#models").count() == 0
    # The key is kept: a reload goes straight to the page, and the chat works with it.
    page.reload()
    answer = send(page, "echo", "hello from the household")
    expect(answer.locator(".stats")).to_contain_text("tok/s")
    expect(answer.locator(".content")).to_have_text("hello from the household")
    page.get_by_role("button", name="Forget key").click()
    expect(key).to_be_visible()
    key.fill(ADMIN_KEY)
    page.get_by_role("button", name="Use key").click()
    expect(nav.get_by_role("link", name="Models")).to_be_visible()
    assert problems.messages == []
    page.context.close()
