"""Serve this example and the transport behind one origin: the page and its bundle from this
directory, `POST /start` and `/sessions/...` forwarded to the transport (the API sends no CORS
headers, so the page must come from the origin it calls). Standard library only.

    python examples/pipecat-client/serve.py --transport http://127.0.0.1:8080 [--port 8090]

Then open http://127.0.0.1:8090/ (add ?agent=NAME, ?key=API_KEY when auth is on).
"""

from __future__ import annotations

import argparse
import functools
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORWARDED = ("/start", "/sessions/")
HEADERS = ("Content-Type", "Authorization", "X-API-Key")


class Handler(SimpleHTTPRequestHandler):
    transport = ""

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        request = urllib.request.Request(self.transport + self.path, data=body, method=self.command)
        for name in HEADERS:
            if self.headers.get(name):
                request.add_header(name, self.headers[name])
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                status, data, kind = reply.status, reply.read(), reply.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            status, data, kind = exc.code, exc.read(), exc.headers.get_content_type()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path.startswith(FORWARDED):
            self._forward()
        else:
            self.send_error(404)

    def do_PATCH(self) -> None:
        self.do_POST()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transport", default="http://127.0.0.1:8080")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    Handler.transport = args.transport.rstrip("/")
    handler = functools.partial(Handler, directory=str(HERE))
    print(f"example at http://{args.host}:{args.port}/ -> transport {Handler.transport}")
    ThreadingHTTPServer((args.host, args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
