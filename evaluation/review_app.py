"""The review web page and its small JSON API (Starlette), served by `refinery review serve`.

GET  /              the page (the reviewer pastes their token once; it stays in the tab)
GET  /api/next      the next example to rate          (Authorization: Bearer <token>)
POST /api/ratings   {"item_id", "rating": 1-5, "comment"}
Errors are JSON {"error": "..."} with 400/401/404/409/413/422; nothing a client sends is a 500.
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from evaluation.review import ReviewError, authenticate, next_item, rate

MAX_BODY = 16 * 1024


def create_app(engine: sa.Engine, tracking_uri: str) -> Starlette:
    def reviewer(request: Request) -> str:
        header = request.headers.get("authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else None
        return authenticate(engine, token)

    async def page(request: Request) -> Response:
        return HTMLResponse(PAGE)

    async def api_next(request: Request) -> Response:
        try:
            item = next_item(engine, reviewer(request))
        except ReviewError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        if item is None:
            return JSONResponse({"item": None, "remaining": 0})
        return JSONResponse({"item": item, "remaining": item.pop("remaining")})

    async def api_rate(request: Request) -> Response:
        try:
            who = reviewer(request)
            body = await request.body()
            if len(body) > MAX_BODY:
                raise ReviewError(413, f"request body over {MAX_BODY} bytes")
            try:
                data: Any = json.loads(body or b"null")
            except ValueError as err:
                raise ReviewError(400, f"body is not JSON: {err}") from err
            if not isinstance(data, dict):
                raise ReviewError(
                    422, 'body must be a JSON object {"item_id", "rating", "comment"}'
                )
            result = rate(
                engine,
                tracking_uri,
                who,
                data.get("item_id"),
                data.get("rating"),
                data.get("comment", ""),
            )
        except ReviewError as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        return JSONResponse(result, status_code=201)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(
        routes=[
            Route("/", page),
            Route("/healthz", health),
            Route("/api/next", api_next),
            Route("/api/ratings", api_rate, methods=["POST"]),
        ]
    )


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Refinery review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 .box{border:1px solid #ccc;border-radius:6px;padding:1rem;margin:1rem 0}
 .q{font-weight:600} .src{color:#666;font-size:.9em} .err{color:#b00020} .ok{color:#1b5e20}
 button{font-size:1rem;padding:.4rem .9rem;margin:.2rem} button[aria-pressed=true]{background:#1565c0;color:#fff}
</style></head><body>
<h1>Rate answers</h1>
<p>Each answer comes from a model you are not told about. Rate how correct and helpful it is:
1 = wrong or useless, 3 = partly right, 5 = correct and complete.</p>
<div id="login" class="box"><label>Reviewer token <input id="token" type="password" size="40"></label>
<button id="start">Start</button></div>
<div id="item" class="box" hidden>
 <p class="q" id="question"></p><p id="answer"></p><p class="src" id="sources"></p>
 <div role="group" aria-label="rating" id="stars"></div>
 <p><label>Comment (optional)<br><textarea id="comment" rows="2" cols="60"></textarea></label></p>
 <button id="submit" disabled>Submit rating</button> <span id="remaining"></span>
</div>
<p id="status" role="status"></p>
<script>
let token = sessionStorage.getItem("refinery-token") || "", current = null, choice = null;
const $ = (id) => document.getElementById(id);
for (let i = 1; i <= 5; i++) {
  const b = document.createElement("button"); b.textContent = i; b.setAttribute("aria-pressed", "false");
  b.onclick = () => { choice = i; document.querySelectorAll("#stars button").forEach(x => x.setAttribute("aria-pressed", x === b)); $("submit").disabled = false; };
  $("stars").appendChild(b);
}
function say(text, cls) { $("status").textContent = text; $("status").className = cls || ""; }
async function api(path, options) {
  const r = await fetch(path, {...options, headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}});
  const body = await r.json().catch(() => ({error: "bad response"}));
  if (!r.ok) throw new Error(body.error || r.status);
  return body;
}
async function load() {
  try {
    const data = await api("/api/next");
    $("login").hidden = true;
    if (!data.item) { $("item").hidden = true; say("Nothing left to rate. Thank you!", "ok"); return; }
    current = data.item; choice = null; $("submit").disabled = true; $("comment").value = "";
    document.querySelectorAll("#stars button").forEach(x => x.setAttribute("aria-pressed", "false"));
    $("question").textContent = current.question; $("answer").textContent = current.answer;
    $("sources").textContent = current.sources.length ? "Sources: " + current.sources.map(s => s.source).join(", ") : "";
    $("remaining").textContent = data.remaining + " left"; $("item").hidden = false;
  } catch (e) { say(e.message, "err"); $("login").hidden = false; }
}
$("start").onclick = () => { token = $("token").value.trim(); sessionStorage.setItem("refinery-token", token); load(); };
$("submit").onclick = async () => {
  try {
    await api("/api/ratings", {method: "POST", body: JSON.stringify({item_id: current.item_id, rating: choice, comment: $("comment").value})});
    say("Saved rating " + choice + ".", "ok"); load();
  } catch (e) { say(e.message, "err"); }
};
if (token) load();
</script></body></html>
"""
