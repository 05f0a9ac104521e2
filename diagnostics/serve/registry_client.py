"""Follow the MLflow model registry at the clinic, without mlflow.

A clinic machine has no mlflow (nor torch). It reads the registry over the tracking server's
REST API with httpx and downloads the registered `.onnx` file, nothing else: no pickles, no
model flavour code. Files are cached by sha256:

    <cache>/sha256/<sha256>.onnx    the model files, content-addressed
    <cache>/refs.json               "models:/cxr@champion" -> name, version, sha256, when

A download is checked against the sha256 that training recorded: the model version's
`onnx_sha256` tag, else its run's `onnx_sha256` tag (see `diagnostics.train.tracking`). When
the server cannot be reached, a ref resolved before keeps its cached file, with a warning.

Routes used (MLflow 2.x/3.x tracking server; checked against mlflow 3.17's server handlers):

    GET /api/2.0/mlflow/registered-models/alias?name=&alias=      {"model_version": {...}}
    GET /api/2.0/mlflow/model-versions/get?name=&version=         {"model_version": {...}}
    GET /api/2.0/mlflow/model-versions/search?filter=name='N'     {"model_versions": [...]}
    GET /api/2.0/mlflow/model-versions/get-download-uri?name=&version=   {"artifact_uri": ...}
    GET /api/2.0/mlflow/runs/get?run_id=                          {"run": {"data": {"tags"}}}
    GET /api/2.0/mlflow-artifacts/artifacts/<path>                proxied artefact bytes
    GET /model-versions/get-artifact?name=&version=&path=         any other artefact store
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import yaml

log = logging.getLogger(__name__)

PROXIED_ROUTE = "/api/2.0/mlflow-artifacts/artifacts"
SHA256_TAGS = ("onnx_sha256", "sha256")  # on the model version, then on its run
# The int8 twin of a version (`diagnostics.train.tracking`): a run artefact, with its sha256
INT8_SHA256_TAG, INT8_PATH_TAG, INT8_GATE_TAG = "onnx_int8_sha256", "onnx_int8_path", "int8_gate"
INT8_DEFAULT_PATH = "int8/model.int8.onnx"


class RegistryError(FileNotFoundError):
    """The model file for a registry URI could not be obtained; the message says why."""


class RegistryUnreachable(RegistryError):
    """The tracking server did not answer (network, timeout, 5xx)."""


class RegistryIntegrityError(RegistryError):
    """A downloaded file does not have the sha256 that training recorded for it."""


@dataclass(frozen=True)
class ModelRef:
    """`models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest`."""

    name: str
    alias: str | None = None
    version: str | None = None  # digits or "latest"

    @classmethod
    def parse(cls, uri: str) -> ModelRef:
        if not uri.startswith("models:/"):
            raise ValueError(f"{uri}: not a registry URI (models:/NAME@ALIAS or models:/NAME/N)")
        body = uri[len("models:/") :]
        if "@" in body:
            name, alias = body.split("@", 1)
            if name and alias and "/" not in name + alias:
                return cls(name, alias=alias)
        else:
            parts = body.split("/")
            if len(parts) == 2 and parts[0] and (parts[1].isdigit() or parts[1] == "latest"):
                return cls(parts[0], version=parts[1])
            if len(parts) == 2 and parts[0] and parts[1]:
                raise ValueError(
                    f"{uri}: registry stages are deprecated and not followed; use an alias "
                    f"(models:/{parts[0]}@champion) or a version number"
                )
        raise ValueError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")

    def __str__(self) -> str:
        return (
            f"models:/{self.name}@{self.alias}"
            if self.alias
            else f"models:/{self.name}/{self.version}"
        )


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    version: str
    sha256: str
    offline: bool = False  # served from the cache because the server could not be reached
    # with resolve(..., int8=True): the version's int8 artefact, sha256-checked, or why not
    int8_path: Path | None = None
    int8_sha256: str | None = None
    int8_note: str = ""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _auth_from_env() -> tuple[Any, dict[str, str], Any]:
    """(auth, headers, verify) from the variables the mlflow client itself reads."""
    headers: dict[str, str] = {}
    auth = None
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = httpx.BasicAuth(user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify: Any = True
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        verify = False
    elif cert := os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        verify = cert
    return auth, headers, verify


class RegistryClient:
    """The registry of one tracking server (`http(s)://host:port`), with a local file cache."""

    def __init__(
        self,
        tracking_uri: str,
        cache_dir: Path,
        *,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not tracking_uri.startswith(("http://", "https://")):
            raise ValueError(f"{tracking_uri}: the registry client needs an http(s) tracking URI")
        self.base = tracking_uri.rstrip("/")
        self.cache_dir = Path(cache_dir)
        auth, headers, verify = _auth_from_env()
        self._http = httpx.Client(
            base_url=self.base,
            auth=auth,
            headers=headers,
            verify=verify,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            follow_redirects=True,
            transport=transport,
        )
        self._offline_since: float | None = None
        # httpx logs every request at INFO; a service polling the registry would fill its log
        if logging.getLogger("httpx").level == logging.NOTSET:
            logging.getLogger("httpx").setLevel(logging.WARNING)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ REST

    def _request(self, path: str, params: dict[str, Any], what: str) -> httpx.Response:
        try:
            r = self._http.get(path, params=params)
        except httpx.TransportError as exc:  # connect, read, timeouts, protocol
            raise RegistryUnreachable(
                f"the tracking server {self.base} cannot be reached ({type(exc).__name__}: "
                f"{exc or 'no answer'})"
            ) from None
        if r.status_code >= 500:
            raise RegistryUnreachable(
                f"the tracking server {self.base} failed on {what} (HTTP {r.status_code})"
            )
        if r.status_code in (401, 403):
            raise RegistryError(
                f"the tracking server {self.base} refused {what} (HTTP {r.status_code}): set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
            )
        if r.status_code >= 400:
            try:
                message = r.json().get("message") or r.text
            except ValueError:
                message = r.text
            raise RegistryError(f"{what}: {message.strip()[:300]} (HTTP {r.status_code})")
        return r

    def _json(self, path: str, params: dict[str, Any], what: str) -> dict[str, Any]:
        r = self._request(path, params, what)
        try:
            return r.json()
        except ValueError:
            raise RegistryError(
                f"{what}: {self.base} did not answer JSON; is it an MLflow tracking server?"
            ) from None

    def model_version(self, ref: ModelRef) -> dict[str, Any]:
        """The model version a ref points at now (REST JSON: name, version, run_id, tags...)."""
        api = "/api/2.0/mlflow"
        if ref.alias:
            found = self._json(
                f"{api}/registered-models/alias",
                {"name": ref.name, "alias": ref.alias},
                f"{ref} (alias {ref.alias} of {ref.name})",
            )
            return found["model_version"]
        if ref.version == "latest":
            versions: list[dict[str, Any]] = []
            params: dict[str, Any] = {"filter": f"name='{ref.name}'", "max_results": 1000}
            while True:
                page = self._json(f"{api}/model-versions/search", params, str(ref))
                versions += page.get("model_versions", [])
                if not page.get("next_page_token"):
                    break
                params["page_token"] = page["next_page_token"]
            if not versions:
                raise RegistryError(f"{ref}: no registered model named {ref.name}")
            return max(versions, key=lambda v: int(v["version"]))
        found = self._json(
            f"{api}/model-versions/get", {"name": ref.name, "version": ref.version}, str(ref)
        )
        return found["model_version"]

    def current_version(self, uri: str) -> str:
        return str(self.model_version(ModelRef.parse(uri))["version"])

    def expected_sha256(self, mv: dict[str, Any]) -> str | None:
        """The sha256 training recorded: a tag of the model version, else of its run."""
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
        for key in SHA256_TAGS:
            if re.fullmatch(r"[0-9a-f]{64}", tags.get(key, "")):
                return tags[key]
        if mv.get("run_id"):
            try:
                run = self._json("/api/2.0/mlflow/runs/get", {"run_id": mv["run_id"]}, "run")
            except RegistryUnreachable:
                raise
            except RegistryError:  # the run is gone (deleted); the version may still serve
                return None
            tags = {t["key"]: t.get("value", "") for t in run["run"]["data"].get("tags", [])}
            if re.fullmatch(r"[0-9a-f]{64}", tags.get("onnx_sha256", "")):
                return tags["onnx_sha256"]
        return None

    def _artifact(self, name: str, version: str, root: str | None, path: str) -> httpx.Request:
        """The request that fetches one file of a model version's artefacts."""
        if root is not None:  # proxied by this server
            return self._http.build_request("GET", f"{PROXIED_ROUTE}/{root}/{path}")
        return self._http.build_request(
            "GET",
            "/model-versions/get-artifact",
            params={"name": name, "version": version, "path": path},
        )

    def _proxied_root(self, artifact_uri: str) -> str | None:
        """The path under the proxied artefact route, or None when the server does not proxy
        this location (then /model-versions/get-artifact reads it server-side)."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme == "mlflow-artifacts":
            return parsed.path.strip("/")
        if parsed.scheme in ("http", "https") and PROXIED_ROUTE + "/" in parsed.path:
            return parsed.path.split(PROXIED_ROUTE + "/", 1)[1].strip("/")
        return None

    def _fetch(self, request: httpx.Request, what: str) -> bytes:
        try:
            r = self._http.send(request)
        except httpx.TransportError as exc:
            raise RegistryUnreachable(
                f"the tracking server {self.base} cannot be reached ({type(exc).__name__})"
            ) from None
        if r.status_code >= 500:
            raise RegistryUnreachable(f"{self.base} failed on {what} (HTTP {r.status_code})")
        if r.status_code >= 400:
            raise RegistryError(f"{what}: HTTP {r.status_code} from {self.base}")
        return r.content

    def _onnx_file(self, name: str, version: str) -> tuple[str | None, str]:
        """(proxied root or None, the .onnx file's path inside the version's artefacts)."""
        uri = self._json(
            "/api/2.0/mlflow/model-versions/get-download-uri",
            {"name": name, "version": version},
            f"models:/{name}/{version}",
        )["artifact_uri"]
        root = self._proxied_root(uri)
        what = f"models:/{name}/{version}"
        try:
            mlmodel = yaml.safe_load(
                self._fetch(self._artifact(name, version, root, "MLmodel"), what)
            )
            data = (mlmodel.get("flavors", {}).get("onnx") or {}).get("data")
        except RegistryUnreachable:
            raise
        except (RegistryError, yaml.YAMLError, AttributeError):
            data = None
        if data is None and root is not None:  # no onnx flavour: look for a single .onnx file
            listing = self._json(PROXIED_ROUTE, {"path": root}, what)
            onnx = sorted(
                f["path"] for f in listing.get("files", []) if f["path"].endswith(".onnx")
            )
            data = onnx[0].rsplit("/", 1)[-1] if onnx else None
        if not data or not str(data).endswith(".onnx"):
            raise RegistryError(f"{what} holds no .onnx file (artefacts at {uri})")
        return root, str(data)

    # ------------------------------------------------------------------ cache

    @property
    def _refs_path(self) -> Path:
        return self.cache_dir / "refs.json"

    def _refs(self) -> dict[str, Any]:
        try:
            return json.loads(self._refs_path.read_text())
        except (OSError, ValueError):
            return {}

    def _record(self, keys: list[str], name: str, version: str, sha256: str) -> None:
        # Write-replace: readers never see a half-written file. Two processes (API and worker)
        # may race; the loser's record is rewritten on its next resolve.
        refs = self._refs()
        entry = {
            "name": name,
            "version": version,
            "sha256": sha256,
            "server": self.base,
            "resolved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key in keys:
            refs[key] = entry
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".refs-", suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump(refs, fh, indent=2, sort_keys=True)
        os.replace(tmp, self._refs_path)

    def cached_path(self, sha256: str) -> Path:
        return self.cache_dir / "sha256" / f"{sha256}.onnx"

    def _cached(self, sha256: str | None) -> Path | None:
        """The cached file with this sha256, checked (a corrupted file is removed)."""
        if not sha256:
            return None
        path = self.cached_path(sha256)
        if not path.is_file():
            return None
        if file_sha256(path) != sha256:
            log.warning("model cache: %s is corrupted; removed", path)
            path.unlink(missing_ok=True)
            return None
        return path

    def _download(self, name: str, version: str, expected: str | None) -> tuple[Path, str]:
        root, data = self._onnx_file(name, version)
        what = f"models:/{name}/{version}"
        return self._download_request(
            self._artifact(name, version, root, data), what, data, expected
        )

    def _download_request(
        self, request: httpx.Request, what: str, data: str, expected: str | None
    ) -> tuple[Path, str]:
        """Stream `request` into the cache, checked against `expected`: (file, sha256)."""
        folder = self.cache_dir / "sha256"
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".onnx")
        tmp = Path(tmp_name)
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as fh:
                r = None
                try:
                    r = self._http.send(request, stream=True)
                    if r.status_code >= 500:
                        raise RegistryUnreachable(
                            f"{self.base} failed on {what} (HTTP {r.status_code})"
                        )
                    if r.status_code >= 400:
                        raise RegistryError(f"{what}: {data}: HTTP {r.status_code}")
                    for chunk in r.iter_bytes(1 << 20):
                        h.update(chunk)
                        fh.write(chunk)
                except httpx.TransportError as exc:
                    raise RegistryUnreachable(
                        f"the download of {what} from {self.base} broke off ({type(exc).__name__})"
                    ) from None
                finally:
                    if r is not None:
                        r.close()
                fh.flush()
                os.fsync(fh.fileno())
            sha = h.hexdigest()
            if expected is not None and sha != expected:
                raise RegistryIntegrityError(
                    f"{what}: the downloaded {data} has sha256 {sha[:12]}…, but training "
                    f"recorded {expected[:12]}…; not used"
                )
            if expected is None:
                log.warning(
                    "%s: no sha256 recorded in the registry (tag onnx_sha256); accepted the "
                    "file as downloaded, sha256 %s",
                    what,
                    sha,
                )
            dest = self.cached_path(sha)
            os.replace(tmp, dest)
            return dest, sha
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ int8

    def _int8_online(self, mv: dict[str, Any]) -> tuple[Path | None, str | None, str]:
        """The version's int8 artefact: (file, sha256, "") or (None, None, why not). Only a
        file whose sha256 training recorded (tag onnx_int8_sha256) is ever used."""
        name, version = mv["name"], str(mv["version"])
        tags = {t["key"]: t.get("value", "") for t in mv.get("tags", [])}
        expected = tags.get(INT8_SHA256_TAG, "")
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            return (
                None,
                None,
                f"models:/{name}/{version} has no int8 artefact (no {INT8_SHA256_TAG})",
            )
        path = self._cached(expected)
        if path is not None:
            return path, expected, ""
        rel = tags.get(INT8_PATH_TAG) or INT8_DEFAULT_PATH
        what = f"models:/{name}/{version} (int8)"
        run_id = mv.get("run_id")
        if not run_id or ".." in rel.split("/"):
            return None, None, f"{what}: no run to read the int8 artefact from"
        run = self._json("/api/2.0/mlflow/runs/get", {"run_id": run_id}, what)
        root = self._proxied_root(run["run"]["info"].get("artifact_uri", ""))
        if root is not None:
            request = self._http.build_request("GET", f"{PROXIED_ROUTE}/{root}/{rel}")
        else:  # the server reads the run's artefact store itself
            request = self._http.build_request(
                "GET", "/get-artifact", params={"path": rel, "run_uuid": run_id}
            )
        path, sha = self._download_request(request, what, rel, expected)
        return path, sha, ""

    def _with_int8(self, found: ResolvedModel, mv: dict[str, Any]) -> ResolvedModel:
        """`found` with its int8 twin, or the reason there is none (an integrity failure of
        the int8 file is a reason, logged: the fp32 file still serves)."""
        try:
            path, sha, note = self._int8_online(mv)
        except RegistryUnreachable:
            raise
        except RegistryError as exc:
            log.warning("int8 artefact not used: %s", exc)
            path, sha, note = None, None, str(exc)
        return replace(found, int8_path=path, int8_sha256=sha, int8_note=note)

    # ------------------------------------------------------------------ public

    def resolve(self, uri: str, *, int8: bool = False) -> ResolvedModel:
        """The local file and version a registry URI points at now, downloaded once per sha256.
        With `int8`, also the version's int8 artefact (`int8_path`, checked against its
        recorded sha256), or why not (`int8_note`).

        If the server cannot be reached, the file this URI resolved to last time is returned
        (`offline=True`) with a logged warning; without one, `RegistryUnreachable`."""
        ref = ModelRef.parse(uri)
        try:
            mv = self.model_version(ref)
            found = self._resolve_online(uri, ref, mv)
            if int8:
                found = self._with_int8(found, mv)
                if found.int8_sha256:
                    self._record_int8(uri, found)
            return found
        except RegistryUnreachable as exc:
            found = self._resolve_offline(uri, exc)
            if not int8:
                return found
            sha = self._refs().get(uri, {}).get("int8_sha256")
            path = self._cached(sha)
            if path is None:
                return replace(found, int8_note="the registry cannot be reached; no int8 cached")
            return replace(found, int8_path=path, int8_sha256=sha)

    def _record_int8(self, uri: str, found: ResolvedModel) -> None:
        """Keep the int8 sha256 with the ref, for an offline start."""
        refs = self._refs()
        changed = False
        for key in (
            uri,
            f"models:/{uri[len('models:/') :].split('@')[0].split('/')[0]}/{found.version}",
        ):
            if key in refs and refs[key].get("int8_sha256") != found.int8_sha256:
                refs[key]["int8_sha256"] = found.int8_sha256
                changed = True
        if changed:
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".refs-", suffix=".json")
            with os.fdopen(fd, "w") as fh:
                json.dump(refs, fh, indent=2, sort_keys=True)
            os.replace(tmp, self._refs_path)

    def _resolve_online(self, uri: str, ref: ModelRef, mv: dict[str, Any]) -> ResolvedModel:
        version = str(mv["version"])
        pinned = f"models:/{ref.name}/{version}"
        expected = self.expected_sha256(mv)
        record = self._refs().get(pinned, {})
        known = record.get("sha256") if record.get("server") == self.base else None
        # a version's file never changes: one recorded before (when nothing newer says
        # otherwise) is reused without a download
        path = self._cached(expected or known)
        sha = expected or known
        if path is None:
            path, sha = self._download(ref.name, version, expected)
        assert sha is not None
        self._record(sorted({uri, pinned}), ref.name, version, sha)
        if self._offline_since is not None:
            log.info("the tracking server %s answers again", self.base)
            self._offline_since = None
        return ResolvedModel(path, version, sha)

    def _resolve_offline(self, uri: str, exc: RegistryUnreachable) -> ResolvedModel:
        entry = self._refs().get(uri)
        if entry is not None and entry.get("server") != self.base:
            entry = None  # resolved against another registry: its names mean other models
        path = self._cached(entry.get("sha256")) if entry else None
        if entry is None or path is None:
            raise RegistryUnreachable(
                f"{uri}: {exc}, and this machine has no cached file for it in {self.cache_dir}"
            ) from None
        log.warning(
            "%s; serving the cached file of %s: version %s, sha256 %s (resolved %s)",
            exc,
            uri,
            entry["version"],
            entry["sha256"][:12],
            entry.get("resolved_at", "?"),
        )
        return ResolvedModel(path, str(entry["version"]), entry["sha256"], offline=True)

    def follow(self, uri: str) -> Callable[[str | None], tuple[Path, str | None] | None]:
        """A model source for `ModelHolder`: (file, version) when `uri` points at another
        version than the current one, else None. An unreachable server is not an error: the
        service keeps its model, and the outage is logged once (and its end)."""
        ref = ModelRef.parse(uri)

        def source(current: str | None) -> tuple[Path, str | None] | None:
            try:
                mv = self.model_version(ref)
                if str(mv["version"]) == current:
                    if self._offline_since is not None:
                        log.info("the tracking server %s answers again", self.base)
                        self._offline_since = None
                    return None
                found = self._resolve_online(uri, ref, mv)
            except RegistryUnreachable as exc:
                if self._offline_since is None:
                    self._offline_since = time.monotonic()
                    log.warning("%s; still serving version %s", exc, current)
                return None
            return found.path, found.version

        return source
