"""Assistants, threads and their runs, as a simulated Azure OpenAI resource keeps them.

Enough of the Assistants API for the openai SDK's `beta` helpers (`create_and_poll`, `stream`,
`submit_tool_outputs_and_poll`) and for metering runs: assistants (create, retrieve, list), threads
(create, with messages; retrieve), their messages (add, list), runs (create, create with a
thread, retrieve, list, cancel, submit tool outputs) and a run's steps (list).

A run is generated out of the call's sight, like Azure's: its create answers `queued` with `usage`
null, and each retrieval moves it one step (`steps`) until it ends; its `usage` shows only then. A
run whose tools include a function stops first at `requires_action`, and goes on once its tool
outputs are submitted. Each pass of the model spends the thread's text (4 characters a token) as
prompt and `10 x chunks` completion tokens; a run's `usage` is the sum of its passes, and each
step carries its own pass's. With `"stream": true` the whole pass is streamed at once, as the
Assistants API's events (`thread.run.created` ... `thread.run.completed` or
`thread.run.requires_action`, then `done`), each run event carrying the run as it stands.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lb.sim.cache import tokens
from lb.sim.pages import error, missing, page

if TYPE_CHECKING:
    from lb.sim import SimBackend

LIMIT = (20, 100)  # (default, max) items of a page
COMPLETION_PER_CHUNK = 10  # completion tokens of a pass per `chunks` of the backend

Answer = tuple[int, Any] | list[bytes]  # (status, body), or the events of a stream


@dataclass
class SimThreads:
    steps: int = 2  # retrievals a run takes to end a pass
    assistants: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # thread id -> oldest first
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # run id -> oldest first
    pending: dict[str, int] = field(default_factory=dict)  # run id -> retrievals left in its pass

    # Assistants ---------------------------------------------------------------------------------
    def serve_assistants(self, method: str, rest: list[str], payload: Any, params: dict[str, str]) -> Answer:
        if not rest and method == "POST":
            request = payload if isinstance(payload, dict) else {}
            aid = f"asst_{uuid.uuid4().hex}"
            self.assistants[aid] = {
                "id": aid,
                "object": "assistant",
                "created_at": int(time.time()),
                "name": request.get("name"),
                "description": None,
                "model": request.get("model"),
                "instructions": request.get("instructions"),
                "tools": request.get("tools") or [],
                "metadata": request.get("metadata") or {},
            }
            return 200, self.assistants[aid]
        if not rest:
            return page(list(self.assistants.values()), params, *LIMIT)
        assistant = self.assistants.get(rest[0])
        if assistant is None:
            return missing("Assistant", rest[0])
        if method == "DELETE":
            del self.assistants[rest[0]]
            return 200, {"id": rest[0], "object": "assistant.deleted", "deleted": True}
        return 200, assistant

    # Threads ------------------------------------------------------------------------------------
    def serve_threads(
        self, backend: SimBackend, method: str, rest: list[str], payload: Any, params: dict[str, str]
    ) -> Answer:
        request = payload if isinstance(payload, dict) else {}
        if rest == ["runs"] and method == "POST":  # create a thread and run it
            made = self._thread(request["thread"] if isinstance(request.get("thread"), dict) else {})
            return self._create_run(backend, made["id"], request, [_event("thread.created", made)])
        if not rest and method == "POST":
            return 200, self._thread(request)
        thread = self.threads.get(rest[0]) if rest else None
        if thread is None:
            return missing("Thread", rest[0] if rest else "")
        tid, more = thread["id"], rest[1:]
        if not more:
            return 200, thread
        if more == ["messages"]:
            if method == "POST":
                return 200, self._message(tid, request.get("role", "user"), _text(request.get("content")))
            return page(self.messages[tid], params, *LIMIT)
        if more[0] != "runs":
            return 404, error("Resource not found.", "invalid_request_error")
        if len(more) == 1:
            if method == "POST":
                return self._create_run(backend, tid, request)
            return page([_shown(r) for r in self.runs.values() if r["thread_id"] == tid], params, *LIMIT)
        run = self.runs.get(more[1])
        if run is None or run["thread_id"] != tid:
            return missing("Run", more[1])
        action = more[2:]
        if action == ["steps"]:
            return page(self.run_steps.get(run["id"], []), params, *LIMIT)
        if action == ["cancel"] and method == "POST":
            if run["status"] in ("queued", "in_progress", "requires_action"):
                self.pending.pop(run["id"], None)
                run.update(status="cancelled", cancelled_at=int(time.time()), required_action=None)
            return 200, run
        if action == ["submit_tool_outputs"] and method == "POST":
            if run["status"] != "requires_action":
                message = f"Runs in status {run['status']} do not accept tool outputs."
                return 400, error(message, "invalid_request_error")
            run.update(status="queued", required_action=None)
            run["outputs_submitted"] = True
            if request.get("stream") is True:
                return self._stream_pass(backend, run, [])
            self.pending[run["id"]] = self.steps
            return 200, _shown(run)
        if action:
            return 404, error("Resource not found.", "invalid_request_error")
        self._step(backend, run)
        return 200, _shown(run)

    def _thread(self, request: dict[str, Any]) -> dict[str, Any]:
        tid = f"thread_{uuid.uuid4().hex}"
        self.threads[tid] = {
            "id": tid,
            "object": "thread",
            "created_at": int(time.time()),
            "metadata": request.get("metadata") or {},
            "tool_resources": None,
        }
        self.messages[tid] = []
        for message in request.get("messages") or []:
            if isinstance(message, dict):
                self._message(tid, message.get("role", "user"), _text(message.get("content")))
        return self.threads[tid]

    def _message(self, tid: str, role: str, text: str, run: dict[str, Any] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {
            "id": f"msg_{uuid.uuid4().hex}",
            "object": "thread.message",
            "created_at": int(time.time()),
            "thread_id": tid,
            "role": role,
            "content": [{"type": "text", "text": {"value": text, "annotations": []}}],
            "assistant_id": run["assistant_id"] if run else None,
            "run_id": run["id"] if run else None,
            "attachments": [],
            "metadata": {},
            "status": "completed",
        }
        self.messages[tid].append(message)
        return message

    # Runs ---------------------------------------------------------------------------------------
    def _create_run(
        self, backend: SimBackend, tid: str, request: dict[str, Any], before: list[bytes] | None = None
    ) -> Answer:
        assistant = self.assistants.get(str(request.get("assistant_id")))
        if assistant is None:
            return missing("Assistant", str(request.get("assistant_id")), "assistant_id")
        for message in request.get("additional_messages") or []:
            if isinstance(message, dict):
                self._message(tid, message.get("role", "user"), _text(message.get("content")))
        now = int(time.time())
        rid = f"run_{uuid.uuid4().hex}"
        self.runs[rid] = {
            "id": rid,
            "object": "thread.run",
            "created_at": now,
            "thread_id": tid,
            "assistant_id": assistant["id"],
            "status": "queued",
            "required_action": None,
            "last_error": None,
            "expires_at": now + 600,
            "started_at": None,
            "cancelled_at": None,
            "failed_at": None,
            "completed_at": None,
            "incomplete_details": None,
            "model": request.get("model") or assistant["model"],
            "instructions": request.get("instructions") or assistant["instructions"] or "",
            "tools": request.get("tools") or assistant["tools"],
            "metadata": request.get("metadata") or {},
            "usage": None,
            "temperature": 1.0,
            "top_p": 1.0,
            "max_prompt_tokens": request.get("max_prompt_tokens"),
            "max_completion_tokens": request.get("max_completion_tokens"),
            "truncation_strategy": {"type": "auto", "last_messages": None},
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "response_format": "auto",
        }
        self.run_steps[rid] = []
        run = self.runs[rid]
        if request.get("stream") is True:
            return self._stream_pass(backend, run, [*(before or []), _event("thread.run.created", run)])
        self.pending[rid] = self.steps
        return 200, _shown(run)

    def _step(self, backend: SimBackend, run: dict[str, Any]) -> None:
        """One retrieval of a run in its pass: queued -> in_progress -> ended (or requires_action)."""
        left = self.pending.get(run["id"])
        if left is None:
            return
        if left > 1:
            self.pending[run["id"]] = left - 1
            run.update(status="in_progress", started_at=run["started_at"] or int(time.time()))
            return
        del self.pending[run["id"]]
        self._pass(backend, run)

    def _pass(self, backend: SimBackend, run: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """One pass of the model over the thread: its step and the words it wrote (none when it
        calls a tool); the run ends, or waits for its tool outputs."""
        tid = run["thread_id"]
        text = run["instructions"] + "".join(
            c["text"]["value"] for m in self.messages[tid] for c in m["content"] if c.get("type") == "text"
        )
        usage = _usage(tokens(text), COMPLETION_PER_CHUNK * backend.chunks)
        before = run.get("spent") or _usage(0, 0)
        run["spent"] = {k: before[k] + usage[k] for k in usage}  # the run's usage once it ends
        now = int(time.time())
        run.update(started_at=run["started_at"] or now)
        calls_tool = any(t.get("type") == "function" for t in run["tools"] if isinstance(t, dict))
        step = {
            "id": f"step_{uuid.uuid4().hex}",
            "object": "thread.run.step",
            "created_at": now,
            "run_id": run["id"],
            "assistant_id": run["assistant_id"],
            "thread_id": tid,
            "status": "completed",
            "cancelled_at": None,
            "completed_at": now,
            "expired_at": None,
            "failed_at": None,
            "last_error": None,
            "metadata": {},
            "usage": usage,
        }
        self.run_steps[run["id"]].append(step)
        if calls_tool and not run.get("outputs_submitted"):
            name = next(t["function"]["name"] for t in run["tools"] if t.get("type") == "function")
            function = {"name": name, "arguments": "{}"}
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": function}
            step.update(type="tool_calls", step_details={"type": "tool_calls", "tool_calls": [call]})
            action = {"type": "submit_tool_outputs", "submit_tool_outputs": {"tool_calls": [call]}}
            run.update(status="requires_action", required_action=action)
            return step, []
        pieces = [f"{backend.name if i == 0 else ''} tok{i}" for i in range(max(1, backend.chunks))]
        message = self._message(tid, "assistant", "".join(pieces), run)
        step.update(
            type="message_creation",
            step_details={"type": "message_creation", "message_creation": {"message_id": message["id"]}},
        )
        run.update(status="completed", completed_at=now, usage=run["spent"])
        return step, pieces

    def _stream_pass(self, backend: SimBackend, run: dict[str, Any], events: list[bytes]) -> list[bytes]:
        """A pass streamed at once: the run's lifecycle events around its step and message."""
        events.append(_event("thread.run.queued", run))
        run.update(status="in_progress", started_at=run["started_at"] or int(time.time()))
        events.append(_event("thread.run.in_progress", run))
        step, pieces = self._pass(backend, run)
        events.append(_event("thread.run.step.created", {**step, "status": "in_progress", "usage": None}))
        if pieces:
            message = self.messages[run["thread_id"]][-1]
            events.append(_event("thread.message.created", {**message, "status": "in_progress", "content": []}))
            for piece in pieces:
                delta = {"content": [{"index": 0, "type": "text", "text": {"value": piece}}]}
                events.append(
                    _event(
                        "thread.message.delta", {"id": message["id"], "object": "thread.message.delta", "delta": delta}
                    )
                )
            events.append(_event("thread.message.completed", message))
            events.append(_event("thread.run.step.completed", step))
            events.append(_event("thread.run.completed", run))
        else:
            events.append(_event("thread.run.requires_action", run))
        return [*events, b"event: done\ndata: [DONE]\n\n"]


def _shown(run: dict[str, Any]) -> dict[str, Any]:
    """The run as an answer shows it (without the simulator's own bookkeeping)."""
    return {k: v for k, v in run.items() if k not in ("spent", "outputs_submitted")}


def _event(name: str, obj: dict[str, Any]) -> bytes:
    shown = _shown(obj) if obj.get("object") == "thread.run" else obj
    return f"event: {name}\ndata: ".encode() + json.dumps(shown, separators=(",", ":")).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _text(content: Any) -> str:
    """A message's text: a string, or its text parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str))
