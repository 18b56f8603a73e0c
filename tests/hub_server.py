"""A loopback Hugging Face Hub for tests: just the endpoints huggingface_hub 2.x and transformers use to create
a model repo, commit files to it, list it and download from it. Repos live in memory.

Every file is committed inline (preupload answers "regular" for all files), so no LFS or Xet storage is needed.
Use it as a context manager; `hub.url` is the endpoint for HF_ENDPOINT.
"""
import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "user"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
REV = r"(?P<rev>[^/]+)"


def git_blob_sha(content: bytes) -> str:
    """The id git (and the Hub) gives a regular file; huggingface_hub compares it to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files at that commit
    head: str = ""

    def files(self, rev: str) -> dict[str, bytes] | None:
        return self.commits.get(self.head if rev == "main" else rev)

    def commit(self, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(self.head.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha(files[path]).encode())
        self.head = digest.hexdigest()
        self.commits[self.head] = files
        return self.head


class HubServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 (random port) that speaks enough of the Hub API."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.requests: list[str] = []  # "METHOD path" of every request, for debugging failed tests
        handler = type("Handler", (HubHandler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "HubServer":
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every reply carries Content-Length
    hub: HubServer

    def log_message(self, *args) -> None:
        pass

    # ------------------------------------------------------------------ plumbing

    def send(self, status: int, body: bytes = b"", headers: dict | None = None, error_code: str | None = None):
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, payload, status: int = 200, error_code: str | None = None) -> None:
        self.send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"}, error_code)

    def body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def route(self, routes: list[tuple[str, object]]) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(f"{self.command} {url.path}")
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.data = self.body()
        for pattern, method in routes:
            if match := re.fullmatch(pattern, url.path):
                try:
                    with self.hub.lock:
                        return method(self, **{k: unquote(v) for k, v in match.groupdict().items() if v is not None})
                except Exception as err:  # a bug here should fail the client's call, not hang it
                    return self.send_json({"error": f"loopback hub: {err!r}"}, 500)
        self.send_json({"error": f"loopback hub: no route for {self.command} {url.path}"}, 404)

    def repo_files(self, repo: str, rev: str) -> dict[str, bytes] | None:
        """The files of `repo` at `rev`, or None after replying 404 the way the Hub does."""
        if repo not in self.hub.repos:
            self.send_json({"error": f"Repository {repo} not found"}, 404, "RepoNotFound")
            return None
        files = self.hub.repos[repo].files(rev)
        if files is None:
            self.send_json({"error": f"Invalid rev id: {rev}"}, 404, "RevisionNotFound")
        return files

    def do_GET(self):
        self.route(GET_ROUTES)

    def do_HEAD(self):
        self.route(GET_ROUTES)

    def do_POST(self):
        self.route(POST_ROUTES)

    # ------------------------------------------------------------------ endpoints

    def whoami(self):
        self.send_json({"type": "user", "name": USER, "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self):
        payload = json.loads(self.data)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.hub.repos:
            return self.send_json({"error": "You already created this model repo", "url": f"{self.hub.url}/{repo_id}"},
                                  409)
        repo = self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        repo.commit({".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self.send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self):
        self.send_json({"warnings": [], "errors": []})

    def preupload(self, repo: str, rev: str):
        payload = json.loads(self.data)
        if (files := self.repo_files(repo, rev)) is None:
            return
        self.send_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                   "oid": git_blob_sha(files[f["path"]]) if f["path"] in files else None}
                                  for f in payload["files"]]})

    def commit(self, repo: str, rev: str):
        lines = [json.loads(line) for line in self.data.splitlines() if line.strip()]
        if (files := self.repo_files(repo, rev)) is None:
            return
        files = dict(files)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            elif line["key"] == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif line["key"] != "header":
                return self.send_json({"error": f"loopback hub: commit key {line['key']!r} unsupported"}, 400)
        sha = self.hub.repos[repo].commit(files)
        self.send_json({"commitUrl": f"{self.hub.url}/{repo}/commit/{sha}", "commitOid": sha,
                        "pullRequestUrl": None})

    def repo_info(self, repo: str, rev: str = "main"):
        if (files := self.repo_files(repo, rev)) is None:
            return
        state = self.hub.repos[repo]
        self.send_json({"id": repo, "modelId": repo, "author": repo.split("/")[0], "private": state.private,
                        "sha": state.head if rev == "main" else rev, "tags": [],
                        "siblings": [{"rfilename": path} for path in sorted(files)]})

    def tree(self, repo: str, rev: str, path: str = ""):
        if (files := self.repo_files(repo, rev)) is None:
            return
        prefix = f"{path.strip('/')}/" if path else ""
        under = sorted(p for p in files if p.startswith(prefix))
        if not under:
            return self.send_json({"error": f"{path} not found"}, 404, "EntryNotFound")
        entries, folders = [], set()
        for p in under:
            rest = p[len(prefix):]
            if "/" in rest and self.query.get("recursive", "false").lower() != "true":
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "path": p, "size": len(files[p]), "oid": git_blob_sha(files[p])})
        entries += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(folders)]
        self.send_json(entries)

    def resolve(self, repo: str, rev: str, filename: str):
        if (files := self.repo_files(repo, rev)) is None:
            return
        if filename not in files:
            return self.send_json({"error": f"{filename} not found"}, 404, "EntryNotFound")
        content = files[filename]
        commit = self.hub.repos[repo].head if rev == "main" else rev
        self.send(200, content, {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha(content)}"',
                                 "Content-Type": "application/octet-stream"})


GET_ROUTES = [
    (r"/api/whoami-v2", HubHandler.whoami),
    (rf"/api/models/{REPO}", HubHandler.repo_info),
    (rf"/api/models/{REPO}/revision/{REV}", HubHandler.repo_info),
    (rf"/api/models/{REPO}/tree/{REV}(?:/(?P<path>.+))?", HubHandler.tree),
    (rf"/{REPO}/resolve/{REV}/(?P<filename>.+)", HubHandler.resolve),
]
POST_ROUTES = [
    (r"/api/repos/create", HubHandler.create_repo),
    (r"/api/validate-yaml", HubHandler.validate_yaml),
    (rf"/api/models/{REPO}/preupload/{REV}", HubHandler.preupload),
    (rf"/api/models/{REPO}/commit/{REV}", HubHandler.commit),
]
