"""A private git host on loopback: git's own smart HTTP server (`git http-backend`, run as
a CGI program) behind a check of the `Authorization` header, the way GitHub serves
private repositories over HTTPS (basic auth, a token as the password; 401 otherwise).

Repositories are configured as GitHub's are: partial clone allowed (`uploadpack.allowFilter`)
and any commit reachable from a ref fetchable by id.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_CONFIG = {
    "uploadpack.allowFilter": "true",
    "uploadpack.allowReachableSHA1InWant": "true",
    "http.receivepack": "true",
}


def http_backend() -> str:
    exec_path = subprocess.run(
        ["git", "--exec-path"], capture_output=True, text=True, check=True
    ).stdout.strip()
    backend = Path(exec_path) / "git-http-backend"
    if not backend.exists():
        import pytest

        pytest.skip(f"git-http-backend not found in {exec_path}")
    return str(backend)


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    status: int


@dataclass
class AuthGitServer:
    """Serves the bare repositories under `root` at http://127.0.0.1:<port>/<name>.git to
    clients sending `Authorization: Basic base64(username:token)`."""

    root: Path
    username: str
    token: str
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def add_repository(self, bare: str | Path) -> str:
        """Move (or copy) a bare repository under the root; return its URL."""
        source = Path(bare)
        dest = self.root / source.name
        if not dest.exists():
            shutil.copytree(source, dest, symlinks=True)
        for key, value in REPO_CONFIG.items():
            subprocess.run(["git", "-C", str(dest), "config", key, value], check=True)
        return self.url(source.name)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    @property
    def expected(self) -> str:
        raw = f"{self.username}:{self.token}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    @property
    def authorized_requests(self) -> int:
        return sum(1 for s in self.seen if s.status < 400)

    @contextlib.contextmanager
    def serving(self) -> Iterator[AuthGitServer]:
        self.root.mkdir(parents=True, exist_ok=True)
        backend = http_backend()
        server_ref = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _serve(self) -> None:
                body = self._body()
                path, _, query = self.path.partition("?")
                auth = self.headers.get("Authorization")
                if auth != server_ref.expected:
                    server_ref.seen.append(Seen(self.command, path, auth, 401))
                    self._reply(
                        401,
                        {"WWW-Authenticate": 'Basic realm="private"', "Content-Type": "text/plain"},
                        b"Invalid username or token.\n",
                    )
                    return
                env = {
                    "PATH": os.environ.get("PATH", ""),
                    "GIT_PROJECT_ROOT": str(server_ref.root),
                    "GIT_HTTP_EXPORT_ALL": "1",
                    "REQUEST_METHOD": self.command,
                    "PATH_INFO": path,
                    "QUERY_STRING": query,
                    "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                    "CONTENT_LENGTH": str(len(body)),
                    "REMOTE_USER": server_ref.username,
                    "REMOTE_ADDR": "127.0.0.1",
                    "GIT_CONFIG_NOSYSTEM": "1",
                    "HOME": str(server_ref.root),
                }
                for header in ("Git-Protocol", "Content-Encoding"):
                    if value := self.headers.get(header):
                        env["HTTP_" + header.upper().replace("-", "_")] = value
                result = subprocess.run(
                    [backend], input=body, env=env, capture_output=True, timeout=120
                )
                head, sep, payload = result.stdout.partition(b"\r\n\r\n")
                if not sep:
                    head, _, payload = result.stdout.partition(b"\n\n")
                status, headers = 200, {}
                for line in head.decode("latin-1").splitlines():
                    key, _, value = line.partition(":")
                    if key.lower() == "status":
                        status = int(value.strip().split()[0])
                    elif key:
                        headers[key.strip()] = value.strip()
                server_ref.seen.append(Seen(self.command, path, auth, status))
                self._reply(status, headers, payload)

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=10)
