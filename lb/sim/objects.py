"""The stateful side of a simulated Azure OpenAI resource: objects that live in it alone.

`SimBackend` hands every object route to `SimObjects.serve`: stored responses (create with `store`,
`previous_response_id`, `conversation` and `background`; retrieve, delete, cancel, input items),
conversations, files (multipart upload, list, retrieve, content, delete), batches made from a file
(create, list, retrieve, cancel; polled from `validating` to `completed`, with an output file),
fine-tuning jobs made from a training (and validation) file (create, list, retrieve, cancel),
assistants, threads and their runs (lb.sim.threads), and reasoning items returned with
`encrypted_content` (asked with `include`), which only this backend accepts back (else 400
`invalid_encrypted_content`). Each backend keeps its own objects,
and an id it does not hold gets the answer Azure OpenAI gives for a missing object: 400
`previous_response_not_found` for a follow-up turn, 404 `... with id '...' not found.` otherwise.
A chat completion's file inputs (`{"type": "file", "file": {"file_id": ...}}`) are read here too
(`chat_files`): a file this backend does not hold is that 404, one it holds is named in the answer.
A background response or a batch moves one step per retrieval (`steps`), so polling ends by itself.

Lists are OpenAI's cursor pages: `{"object": "list", "data", "first_id", "last_id", "has_more"}`,
newest first unless `order=asc`, `limit` items after the `after` id (files: 1-10,000, default
10,000, and `purpose`; batches and fine-tuning jobs: 1-100, default 20), as Azure documents
GET /openai/v1/files and /openai/v1/batches (learn.microsoft.com/azure/foundry/reference/rest/
files-list-files, batches-list-batches). An `after` this backend does not hold is a 400 here (what
Azure answers is not documented): a list merged from several backends must not pass one backend's
cursor to another.

Routes are matched on the decoded path (uvicorn's `scope["path"]`), so an encoded slash in an id
(`resp_1%2Finput_items`) is a path separator here, as it is to Azure's router. Bodies are read as a
lenient backend reads them: `json.loads` on the bytes, whatever the Content-Type, so UTF-16 or
UTF-32 JSON (which Python detects) is understood too.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from lb import sim
from lb.sim.pages import error as _error
from lb.sim.pages import missing as _missing
from lb.sim.pages import page as _page
from lb.sim.threads import SimThreads

if TYPE_CHECKING:
    from lb.sim import Receive, Send, SimBackend

PREFIXES = ("/openai/v1/", "/openai/")
COLLECTIONS = ("responses", "conversations", "files", "batches", "fine_tuning", "assistants", "threads")
FILES_LIMIT = (10_000, 10_000)  # (default, max) items of a files list page
PAGE_LIMIT = (20, 100)  # batches and fine-tuning jobs


@dataclass
class SimObjects:
    steps: int = 2  # retrievals a background response or a batch takes to complete
    responses: dict[str, dict[str, Any]] = field(default_factory=dict)
    inputs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    conversations: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # fine-tuning jobs
    _pending: dict[str, int] = field(default_factory=dict)  # object id -> retrievals left before it is done
    _finals: dict[str, dict[str, Any]] = field(default_factory=dict)  # background response id -> its answer
    reasoning: set[str] = field(default_factory=set)  # reasoning item ids whose encrypted_content this resource made
    threads: SimThreads = field(default_factory=SimThreads)  # assistants, threads and their runs

    def handles(self, path: str) -> list[str] | None:
        """The path's segments after the prefix when it is an object route, else None."""
        for prefix in PREFIXES:
            if path.startswith(prefix):
                segments = path[len(prefix) :].strip("/").split("/")
                return segments if segments[0] in COLLECTIONS else None
        return None

    async def serve(
        self,
        backend: SimBackend,
        method: str,
        segments: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        rate: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
        query: str = "",
    ) -> None:
        collection, rest = segments[0], segments[1:]
        params = dict(parse_qsl(query))
        answer = getattr(self, f"_{collection}")(backend, method, rest, headers, body, payload, params)
        if isinstance(answer, Stream):
            return await backend._stream(receive, send, rate, answer.events)
        status, content = answer
        if isinstance(content, bytes):
            data = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(content)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": data + rate})
            await send({"type": "http.response.body", "body": content})
            return
        await backend._json(send, status, content, rate)

    # Responses ----------------------------------------------------------------------------------
    def _responses(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        if not rest:
            if not isinstance(payload, dict):
                return 400, _error("We could not parse the JSON body of your request.", "invalid_request_error")
            return self.create_response(backend, payload)
        rid, action = rest[0], rest[1] if len(rest) > 1 else None
        response = self.responses.get(rid)
        if response is None:
            return _missing("Response", rid)
        if method == "DELETE" and action is None:
            del self.responses[rid]
            self.inputs.pop(rid, None)
            return 200, {"id": rid, "object": "response.deleted", "deleted": True}
        if action == "cancel":
            if not response.get("background"):
                return 400, _error("Only background responses can be cancelled.", "invalid_request_error")
            if response["status"] in ("queued", "in_progress"):
                response["status"] = "cancelled"
                self._pending.pop(rid, None)
            return 200, response
        if action == "input_items":
            items = self.inputs.get(rid, [])
            first, last = (items[0]["id"], items[-1]["id"]) if items else (None, None)
            return 200, {"object": "list", "data": items, "first_id": first, "last_id": last, "has_more": False}
        self._step(rid, response)
        return 200, response

    def create_response(self, backend: SimBackend, request: dict[str, Any]) -> Any:
        """What `POST responses` with this body answers: (status, body), or a `Stream` when it streams."""
        previous = request.get("previous_response_id")
        if previous is not None and previous not in self.responses:
            return 400, _error(
                f"Previous response with id '{previous}' not found.",
                "invalid_request_error",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        conversation = request.get("conversation")
        conversation_id = conversation.get("id") if isinstance(conversation, dict) else conversation
        if conversation_id is not None and conversation_id not in self.conversations:
            return _missing("Conversation", conversation_id, "conversation")
        for file_id in _input_file_ids(request.get("input")):
            if file_id not in self.files:
                return _missing("File", file_id, "input")
        items = request.get("input")
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict) and item.get("type") == "reasoning" and item.get("id") not in self.reasoning:
                return 400, _error(
                    f"The encrypted content for item {item.get('id')} could not be verified.",
                    "invalid_request_error",
                    code="invalid_encrypted_content",
                )
        response, pieces = sim._response(backend.name, sim._deployment("", request), request, backend.chunks)
        if "reasoning.encrypted_content" in (request.get("include") or []):
            item_id = f"rs_{uuid.uuid4().hex}"
            self.reasoning.add(item_id)
            encrypted = f"gAAAAA{uuid.uuid4().hex}{backend.name}"
            response["output"].append(
                {"id": item_id, "type": "reasoning", "summary": [], "encrypted_content": encrypted}
            )
        if conversation_id is not None:
            response["conversation"] = {"id": conversation_id}
        if request.get("background"):
            response.update(background=True, status="queued", output=[], usage=None)
            self._pending[response["id"]] = self.steps
            self._finals[response["id"]] = sim._response(backend.name, response["model"], request, backend.chunks)[0]
        if request.get("store", True) is not False:
            self.responses[response["id"]] = response
            self.inputs[response["id"]] = _input_items(request.get("input"))
        if request.get("stream") is True and not request.get("background"):
            return Stream(sim._response_events(response, pieces))
        return 200, response

    # Assistants and threads (lb.sim.threads) ----------------------------------------------------
    def _assistants(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        return self.threads.serve_assistants(method, rest, payload, params)

    def _threads(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        answer = self.threads.serve_threads(backend, method, rest, payload, params)
        return Stream(answer) if isinstance(answer, list) else answer

    # Conversations ------------------------------------------------------------------------------
    def _conversations(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        if not rest and method == "POST":
            cid = f"conv_{uuid.uuid4().hex}"
            metadata = payload.get("metadata") if isinstance(payload, dict) else None
            self.conversations[cid] = {
                "id": cid,
                "object": "conversation",
                "created_at": int(time.time()),
                "metadata": metadata or {},
            }
            return 200, self.conversations[cid]
        cid = rest[0] if rest else ""
        if cid not in self.conversations:
            return _missing("Conversation", cid)
        if method == "DELETE":
            del self.conversations[cid]
            return 200, {"id": cid, "object": "conversation.deleted", "deleted": True}
        return 200, self.conversations[cid]

    # Files --------------------------------------------------------------------------------------
    def _files(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        if not rest and method == "POST":
            fields = _multipart(headers.get("content-type", ""), body)
            if "file" not in fields:
                return 400, _error("The file is missing.", "invalid_request_error", param="file")
            filename, content = fields["file"]
            purpose = fields.get("purpose", ("", b""))[1].decode() or "batch"
            return 200, self._add_file(filename or "upload.jsonl", content, purpose)
        if not rest:
            wanted = params.get("purpose")
            files = [f for f in self.files.values() if wanted is None or f["purpose"] == wanted]
            return _page(files, params, *FILES_LIMIT)
        fid = rest[0]
        if fid not in self.files:
            return _missing("File", fid)
        if method == "DELETE":
            del self.files[fid]
            self.contents.pop(fid, None)
            return 200, {"id": fid, "object": "file", "deleted": True}
        if len(rest) > 1 and rest[1] == "content":
            return 200, self.contents[fid]
        return 200, self.files[fid]

    def _add_file(self, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        fid = f"file-{uuid.uuid4().hex}"
        self.files[fid] = {
            "id": fid,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.contents[fid] = content
        return self.files[fid]

    # Batches ------------------------------------------------------------------------------------
    def _batches(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        if not rest and method == "POST":
            request = payload if isinstance(payload, dict) else {}
            input_file = request.get("input_file_id")
            if input_file not in self.files:
                return _missing("File", str(input_file), "input_file_id")
            bid = f"batch_{uuid.uuid4().hex}"
            lines = [line for line in self.contents[input_file].splitlines() if line.strip()]
            self.batches[bid] = {
                "id": bid,
                "object": "batch",
                "endpoint": request.get("endpoint", "/chat/completions"),
                "errors": None,
                "input_file_id": input_file,
                "completion_window": request.get("completion_window", "24h"),
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                "metadata": request.get("metadata"),
            }
            self._pending[bid] = self.steps
            return 200, self.batches[bid]
        if not rest:
            return _page(list(self.batches.values()), params, *PAGE_LIMIT)
        bid = rest[0]
        batch = self.batches.get(bid)
        if batch is None:
            return _missing("Batch", bid)
        if len(rest) > 1 and rest[1] == "cancel":
            if batch["status"] in ("validating", "in_progress"):
                batch["status"] = "cancelled"
                self._pending.pop(bid, None)
            return 200, batch
        self._step(bid, batch, backend)
        return 200, batch

    # Fine-tuning jobs ---------------------------------------------------------------------------
    def _fine_tuning(
        self,
        backend: SimBackend,
        method: str,
        rest: list[str],
        headers: dict[str, str],
        body: bytes,
        payload: Any,
        params: dict[str, str],
    ) -> Any:
        if not rest or rest[0] != "jobs":
            return 404, _error("Resource not found.", "invalid_request_error")
        rest = rest[1:]
        if not rest and method == "POST":
            request = payload if isinstance(payload, dict) else {}
            for name in ("training_file", "validation_file"):
                fid = request.get(name)
                if (name == "training_file" or fid is not None) and fid not in self.files:
                    return _missing("File", str(fid), name)
            jid = f"ftjob-{uuid.uuid4().hex}"
            self.jobs[jid] = {
                "id": jid,
                "object": "fine_tuning.job",
                "model": request.get("model"),
                "created_at": int(time.time()),
                "finished_at": None,
                "fine_tuned_model": None,
                "organization_id": backend.name,
                "result_files": [],
                "status": "validating_files",
                "training_file": request["training_file"],
                "validation_file": request.get("validation_file"),
                "hyperparameters": request.get("hyperparameters") or {"n_epochs": "auto"},
                "trained_tokens": None,
                "error": None,
                "seed": request.get("seed", 42),
                "metadata": request.get("metadata"),
            }
            return 200, self.jobs[jid]
        if not rest:
            return _page(list(self.jobs.values()), params, *PAGE_LIMIT)
        job = self.jobs.get(rest[0])
        if job is None:
            return _missing("Fine-tuning job", rest[0])
        if len(rest) > 1 and rest[1] == "cancel":
            if job["status"] not in ("succeeded", "failed", "cancelled"):
                job["status"] = "cancelled"
            return 200, job
        return 200, job

    # Chat completions' file inputs --------------------------------------------------------------
    def chat_files(self, payload: Any) -> tuple[tuple[int, dict[str, Any]] | None, str]:
        """(the refusal of a chat naming a file this backend does not hold, else None; the note its answer
        carries about the files it read), so a chat reaching the wrong backend, or another client's file, shows."""
        notes = []
        for fid in _chat_file_ids(payload):
            if fid not in self.files:
                return _missing("File", fid, "messages"), ""
            notes.append(
                f" Read {fid} ({self.files[fid]['filename']}): {self.contents[fid][:80].decode(errors='replace')}"
            )
        return None, "".join(notes)

    # Progress -----------------------------------------------------------------------------------
    def _step(self, oid: str, obj: dict[str, Any], backend: SimBackend | None = None) -> None:
        """One retrieval of a pending object: queued/validating -> in_progress -> completed."""
        left = self._pending.get(oid)
        if left is None:
            return
        left -= 1
        if left > 0:
            self._pending[oid] = left
            obj["status"] = "in_progress"
            return
        del self._pending[oid]
        if obj["object"] == "response":
            obj.update({**self._finals.pop(oid), "id": oid, "background": True, "status": "completed"})
            return
        lines = [line for line in self.contents.get(obj["input_file_id"], b"").splitlines() if line.strip()]
        output = b"".join(_batch_line(line, backend.name if backend else "sim") for line in lines)
        out = self._add_file(f"{oid}_output.jsonl", output, "batch_output")
        obj.update(status="completed", output_file_id=out["id"], completed_at=int(time.time()))
        obj["request_counts"] = {"total": len(lines), "completed": len(lines), "failed": 0}


@dataclass
class Stream:
    events: list[bytes]


def _chat_file_ids(payload: Any) -> list[str]:
    """`file_id`s of a chat's `{"type": "file", "file": {"file_id": ...}}` content parts."""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    found = []
    for message in messages if isinstance(messages, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            file = part.get("file") if isinstance(part, dict) and part.get("type") == "file" else None
            if isinstance(file, dict) and isinstance(file.get("file_id"), str):
                found.append(file["file_id"])
    return found


def _input_items(value: Any) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value or []
    items = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        parts = [{"type": "input_text", "text": content}] if isinstance(content, str) else content or []
        items.append(
            {
                "id": f"msg_{uuid.uuid4().hex}",
                "type": "message",
                "role": message.get("role", "user"),
                "status": "completed",
                "content": parts,
            }
        )
    return items


def _input_file_ids(value: Any) -> list[str]:
    found = []
    for message in value if isinstance(value, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and isinstance(part.get("file_id"), str):
                found.append(part["file_id"])
    return found


def _batch_line(line: bytes, backend: str) -> bytes:
    try:
        request = json.loads(line)
    except ValueError:
        request = {}
    body = sim._completion(backend, (request.get("body") or {}).get("model"))
    result = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.get("custom_id"), "error": None}
    result["response"] = {"status_code": 200, "request_id": str(uuid.uuid4()), "body": body}
    return json.dumps(result).encode() + b"\n"


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, bytes) of a multipart/form-data body (enough for the SDK's uploads)."""
    boundary = next((p.split("=", 1)[1].strip('"') for p in content_type.split(";") if "boundary=" in p), None)
    if not boundary:
        return {}
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        disposition = next(
            (h for h in head.decode("latin-1").split("\r\n") if h.lower().startswith("content-disp")), ""
        )
        params = dict(
            (k.strip(), v.strip().strip('"')) for k, _, v in (p.partition("=") for p in disposition.split(";")[1:])
        )
        if "name" in params:
            fields[params["name"]] = (params.get("filename"), data.removesuffix(b"\r\n"))
    return fields
