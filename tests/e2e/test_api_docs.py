"""/docs (Swagger UI) and /redoc work without internet access: the page and every script,
stylesheet, icon and schema it loads come from the server itself, not from a CDN."""

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

pytestmark = pytest.mark.e2e

# What each kind of reference must be answered with.
CONTENT_TYPES = {
    ".js": "javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
    "": "text/html",  # Swagger UI's OAuth2 redirect page
}


class References(HTMLParser):
    """The URLs a page loads: src/href attributes, ReDoc's spec-url, and the quoted
    server paths its inline script passes to Swagger UI (the schema, the OAuth2 redirect)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls.update(v for k, v in attrs if k in ("src", "href", "spec-url") and v)

    def handle_data(self, data: str) -> None:
        if self.lasttag == "script":
            self.urls.update(re.findall(r"""['"](/[^'"\s]*)['"]""", data))


@pytest.mark.parametrize(
    ("page", "kinds"),
    [("/docs", {".js", ".css", ".png", ".json", ""}), ("/redoc", {".js", ".png", ".json"})],
)
def test_docs_page_loads_everything_from_the_server(shipped, page, kinds):
    response = httpx.get(shipped.url + page, timeout=10)
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    html = response.text
    server = urlsplit(shipped.url).netloc
    # No absolute URL to another host (a CDN, Google Fonts, the online validator).
    foreign = [u for u in re.findall(r"https?://[^\s'\"<>]+", html) if urlsplit(u).netloc != server]
    assert not foreign, foreign
    parser = References()
    parser.feed(html)
    found = set()
    for ref in sorted(parser.urls):
        url = urljoin(shipped.url + page, ref)
        assert urlsplit(url).netloc == server, url
        suffix = re.search(r"(\.[a-z]+)?$", urlsplit(url).path).group(0)
        asset = httpx.get(url, timeout=10)
        assert asset.status_code == 200, (url, asset.status_code)
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers)
        assert asset.content, url
        found.add(suffix)
    assert found == kinds, parser.urls
