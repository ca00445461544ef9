"""The smallest honest stand-in of the Hugging Face Hub's HTTP API for `upload_folder`, run on loopback.

No real local Hub can take uploads here (hf-local-hub ships no server; olah mirrors downloads only), so this
implements the endpoints huggingface_hub calls -- create repo, create branch, preupload (answering "regular"
upload mode), and the NDJSON commit with base64 file contents -- and stores what it receives, including the
Authorization header each request carried, so a test can check both the files and where the token went.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.auth_headers: list[str | None] = []
        self.requests: list[str] = []


def make_handler(state: HubState):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_POST(self):
            state.auth_headers.append(self.headers.get("Authorization"))
            state.requests.append(f"POST {self.path}")
            body = self._body()
            if self.path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req.get('organization') or 'user'}/{req['name']}" if "/" not in req["name"] else req["name"]
                state.repos.setdefault(repo, {"private": req.get("private"), "branches": {"main"}})
                return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            if self.path == "/api/validate-yaml":
                # The Hub checks a model card's YAML front matter; so does the stand-in.
                import yaml

                content = json.loads(body)["content"]
                try:
                    front = content.split("---")[1] if content.startswith("---") else ""
                    meta = yaml.safe_load(front) or {}
                    assert isinstance(meta, dict)
                except Exception as e:  # noqa: BLE001
                    return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                return self._json(200, {"errors": [], "warnings": []})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/branch/(.+)$", self.path)
            if m:
                state.repos[m.group(1)]["branches"].add(m.group(2))
                return self._json(200, {})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$", self.path)
            if m:
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files], "commitOid": "0" * 40})
            m = re.match(r"^/api/models/([^/]+/[^/]+)/commit/(.+)$", self.path)
            if m:
                repo, rev = m.group(1), m.group(2).replace("%2F", "/")
                store = state.files.setdefault((repo, rev), {})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item.get("key") == "file":
                        store[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                oid = hashlib.sha1(body).hexdigest()
                return self._json(200, {"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}",
                                         "commitOid": oid})
            return self._json(404, {"error": f"not in stand-in: {self.path}"})

        def do_GET(self):
            state.auth_headers.append(self.headers.get("Authorization"))
            state.requests.append(f"GET {self.path}")
            m = re.match(r"^/api/models/([^/]+/[^/]+)(/revision/(.+))?$", self.path.split("?")[0])
            if m and m.group(1) in state.repos:
                return self._json(200, {"id": m.group(1), "sha": "0" * 40, "siblings": [], "private": False})
            return self._json(404, {"error": "not found"})

    return H


def start() -> tuple[ThreadingHTTPServer, HubState, str]:
    state = HubState()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, state, f"http://127.0.0.1:{srv.server_address[1]}"
