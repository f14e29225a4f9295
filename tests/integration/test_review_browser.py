"""A reviewer rates an answer on the review page in a real browser (Debian's Chromium, driven
headless by Playwright), and the rating counts in the aggregate the promotion gate reads."""

from __future__ import annotations

import shutil
import threading

import pytest
import uvicorn

from evaluation import review
from evaluation.review_app import create_app
from tests.review_helpers import make_queue
from tests.support import free_port, wait_for

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def review_server(store, mlflow_uri):
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(store.engine, mlflow_uri), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(
            lambda: server.started or not thread.is_alive(), 30, "the review server", interval=0.1
        )
        assert server.started, "the review server stopped before it started"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert not thread.is_alive(), "the review server did not stop"


def test_rating_through_the_review_page_is_counted(store, mlflow_uri, tmp_path, review_server):
    from playwright.sync_api import sync_playwright

    make_queue(store.engine, mlflow_uri, tmp_path, labels=("chat/7",), per_model=2)
    token = review.add_reviewer(store.engine, "eve")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page()
        page.goto(review_server + "/")
        page.fill("#token", "wrong-token")
        page.click("#start")
        page.wait_for_selector("#status.err")
        assert "unknown reviewer token" in page.inner_text("#status")
        page.fill("#token", token)
        page.click("#start")
        page.wait_for_selector("#item:not([hidden])")
        assert "Question" in page.inner_text("#question") and "chat/7" not in page.inner_text(
            "#item"
        )  # blind
        assert page.inner_text("#remaining") == "2 left"
        page.click("#stars button:text-is('4')")
        page.fill("#comment", "right, if terse")
        page.click("#submit")
        page.wait_for_selector("#status.ok")
        assert page.inner_text("#status") == "Saved rating 4."
        page.wait_for_function("document.getElementById('remaining').textContent === '1 left'")
        page.screenshot(path=str(tmp_path / "review.png"))
        browser.close()
    ratings = review.collect_ratings(store.engine, mlflow_uri, "chat/7")
    assert ratings.ratings == [4]
    assert ratings.summary().count == 1
