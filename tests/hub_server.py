"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: the calls huggingface_hub makes to create a
repo, upload files (regular commit path, no LFS/Xet) and download them again (see
shared/notes/hub-test-endpoints.md). Repos live in memory."""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPO = r"(?P<type>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"


class Repo:
    def __init__(self, repo_id, private):
        self.id, self.private, self.files, self.commits = repo_id, private, {}, []

    @property
    def sha(self):
        return self.commits[-1] if self.commits else "0" * 40


class HubServer:
    """``with HubServer() as hub: os.environ["HF_ENDPOINT"] = hub.url``; ``hub.repos`` holds what arrived."""

    def __init__(self):
        self.repos, self.requests = {}, []
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, status, body=None, headers=None, head=False):
        payload = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if isinstance(body, bytes) else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, match):
        return self.hub.repos.get(f"{match['ns']}/{match['name']}")

    def do_POST(self):
        path = urlparse(self.path).path
        self.hub.requests.append(("POST", path))
        body = self._body()
        if path == "/api/repos/create":
            spec = json.loads(body)
            repo_id = f"{spec.get('organization') or 'user'}/{spec['name']}"
            prefix = {"dataset": "datasets/", "space": "spaces/"}.get(spec.get("type") or "model", "")
            url = f"{self.hub.url}/{prefix}{repo_id}"
            if repo_id in self.hub.repos:
                return self._reply(409, {"error": "You already created this repo", "url": url})
            self.hub.repos[repo_id] = Repo(repo_id, spec.get("private") or spec.get("visibility") == "private")
            return self._reply(200, {"url": url})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        match = re.fullmatch(rf"/api/{REPO}/preupload/(?P<rev>.+)", path)
        if match:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        match = re.fullmatch(rf"/api/{REPO}/commit/(?P<rev>.+)", path)
        if match:
            repo = self._repo(match)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] == "deletedFile":
                    repo.files.pop(item["value"]["path"], None)
                elif item["key"] == "deletedFolder":
                    folder = item["value"]["path"].rstrip("/") + "/"
                    for name in [n for n in repo.files if n.startswith(folder)]:
                        del repo.files[name]
            repo.commits.append(hashlib.sha1(f"{repo.id}{len(repo.commits)}{sorted(repo.files)}".encode()).hexdigest())
            return self._reply(200, {"commitUrl": f"{self.hub.url}/{repo.id}/commit/{repo.sha}", "commitOid": repo.sha, "pullRequestUrl": None})
        return self._reply(404, {"error": f"no route {path}"})

    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append(("HEAD" if head else "GET", path))
        if path == "/api/whoami-v2":
            return self._reply(200, {"name": "user", "type": "user", "orgs": [], "auth": {}}, head=head)
        match = re.fullmatch(rf"/api/{REPO}(?:/revision/(?P<rev>[^/]+))?", path)
        if match:
            repo = self._repo(match)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            return self._reply(200, {"id": repo.id, "modelId": repo.id, "sha": repo.sha, "private": repo.private,
                                     "siblings": [{"rfilename": n} for n in sorted(repo.files)]}, head=head)
        match = re.fullmatch(rf"/api/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?", path)
        if match:
            repo = self._repo(match)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            prefix = (match["sub"] or "").strip("/")
            entries, folders = [], set()
            for name, content in sorted(repo.files.items()):
                if prefix and not name.startswith(prefix + "/"):
                    continue
                rest = name[len(prefix) + 1:] if prefix else name
                if "/" in rest and "recursive=true" not in self.path.lower():
                    folders.add((prefix + "/" if prefix else "") + rest.split("/")[0])
                    continue
                entries.append({"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()})
            entries += [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
            return self._reply(200, entries, head=head)
        match = re.fullmatch(r"/(?:(?:datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
        if match:
            repo = self._repo(match)
            if repo is None:
                return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
            if match["file"] not in repo.files:
                return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, head)
            content = repo.files[match["file"]]
            etag = '"' + hashlib.sha1(content).hexdigest() + '"'
            return self._reply(200, content, {"X-Repo-Commit": repo.sha, "ETag": etag}, head)
        return self._reply(404, {"error": f"no route {path}"}, head=head)
