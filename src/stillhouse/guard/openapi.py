"""The guard's OpenAPI 3.0 schema, served at ``/openapi.json`` (schemathesis fuzzes against it).

It describes what the guard itself checks: the request fields it validates, the auth it
demands and every status it can answer. The upstream's own response bodies are passed
through and only loosely described.
"""

from __future__ import annotations

from typing import Any

_ERR = {"$ref": "#/components/schemas/Error"}


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema or _ERR}}}


_PROXY_ERRORS = {
    "400": _resp("malformed JSON or an invalid field"),
    "401": _resp("missing, invalid or revoked API key"),
    "403": _resp("account blocked, or a feature refused in degrade mode"),
    "413": _resp("body larger than max_body_bytes"),
    "429": _resp("rate limit; see the Retry-After header"),
    "502": _resp("upstream unreachable"),
    "503": _resp("traffic log down and the guard fails closed"),
    "504": _resp("upstream timed out"),
}
_ADMIN_ERRORS = {
    "400": _resp("invalid field"),
    "401": _resp("admin token missing or wrong"),
    "404": _resp("no such account, key or decision"),
    "409": _resp("conflict (e.g. rotating a revoked key)"),
    "503": _resp("store unavailable"),
}
_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.@:-]{1,128}$"}


def openapi_schema() -> dict[str, Any]:
    """The schema as a dict."""
    message = {
        "type": "object", "required": ["role"],
        "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                       "content": {"type": "string", "nullable": True}},
    }
    sampling = {
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
        "n": {"type": "integer", "minimum": 1, "maximum": 8},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "exclusiveMinimum": True},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        "stream": {"type": "boolean"},
        "seed": {"type": "integer"},
    }
    account_id = {"name": "id", "in": "path", "required": True, "schema": _ID}
    return {
        "openapi": "3.0.3",
        "info": {"title": "stillhouse guard", "version": "0.1.0",
                 "description": "OpenAI-compatible gateway that authenticates, logs, limits and enforces."},
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"},
                                "adminToken": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                    "type": "object", "required": ["message", "type"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": "string", "nullable": True},
                                   "code": {"type": "string", "nullable": True}}}}},
                "ChatRequest": {"type": "object", "required": ["model", "messages"],
                                "properties": {"model": {"type": "string", "minLength": 1},
                                               "messages": {"type": "array", "minItems": 1, "maxItems": 8,
                                                            "items": message}, **sampling}},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"],
                                      "properties": {"model": {"type": "string", "minLength": 1},
                                                     "prompt": {"type": "string"}, **sampling}},
                "Passthrough": {"type": "object", "description": "the upstream's answer, passed through"},
                "Account": {"type": "object", "properties": {
                    "account_id": _ID, "org": {"type": "string", "maxLength": 512},
                    "signup_path": {"type": "string", "maxLength": 512},
                    "country": {"type": "string", "maxLength": 512},
                    "payment_fingerprint": {"type": "string", "maxLength": 512},
                    "limits": {"type": "object", "additionalProperties": False, "properties": {
                        "requests_per_min": {"type": "integer", "minimum": 0, "nullable": True},
                        "tokens_per_min": {"type": "integer", "minimum": 0, "nullable": True},
                        "max_concurrent_streams": {"type": "integer", "minimum": 0, "nullable": True},
                        "requests_per_day": {"type": "integer", "minimum": 0, "nullable": True}}}}},
                "DecisionIn": {"type": "object", "required": ["target", "action"], "properties": {
                    "scope": {"type": "string", "enum": ["account", "cluster"]}, "target": _ID,
                    "action": {"type": "string", "enum": ["allow", "throttle", "degrade", "block"]},
                    "reason": {"type": "string", "maxLength": 512}, "by": {"type": "string", "maxLength": 512},
                    "at_least": {"type": "boolean", "description": "at least this action: the detector and the "
                                 "rules may still go harsher (default false: exactly this action)"}}},
                "Health": {"type": "object", "required": ["status", "store", "upstream"],
                           "additionalProperties": False, "properties": {
                               "status": {"type": "string", "enum": ["ok"]},
                               "store": {"type": "string", "enum": ["up", "down"]},
                               "upstream": {"type": "string"}}},
                "Any": {"type": "object"},
            },
        },
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "chatCompletions", "security": [{"apiKey": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
                "responses": {"200": {"description": "the upstream's answer (JSON, or SSE when stream=true)",
                                      "content": {"application/json": {"schema": {
                                          "$ref": "#/components/schemas/Passthrough"}},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                              **_PROXY_ERRORS}}},
            "/v1/completions": {"post": {
                "operationId": "completions", "security": [{"apiKey": []}],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": {"200": _resp("the upstream's answer", {"$ref": "#/components/schemas/Passthrough"}),
                              **_PROXY_ERRORS}}},
            "/v1/models": {"get": {"operationId": "models", "security": [{"apiKey": []}],
                                   "responses": {"200": _resp("models", {"$ref": "#/components/schemas/Passthrough"}),
                                                 **_PROXY_ERRORS}}},
            "/health": {"get": {"operationId": "health", "security": [], "responses": {
                "200": _resp("the guard is up (answered from memory; never calls the upstream)",
                             {"$ref": "#/components/schemas/Health"})}}},
            "/healthz": {"get": {"operationId": "healthz", "responses": {
                "200": _resp("up", {"$ref": "#/components/schemas/Any"}),
                "503": _resp("log store down (fail-closed)", {"$ref": "#/components/schemas/Any"})}}},
            "/admin/accounts": {
                "post": {"operationId": "createAccount", "security": [{"adminToken": []}],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/Account"}}}},
                         "responses": {"200": _resp("updated", {"$ref": "#/components/schemas/Any"}),
                                       "201": _resp("created", {"$ref": "#/components/schemas/Any"}),
                                       **_ADMIN_ERRORS}},
                "get": {"operationId": "listAccounts", "security": [{"adminToken": []}],
                        "responses": {"200": _resp("accounts", {"$ref": "#/components/schemas/Any"}),
                                      **_ADMIN_ERRORS}}},
            "/admin/accounts/{id}": {"get": {
                "operationId": "getAccount", "security": [{"adminToken": []}], "parameters": [account_id],
                "responses": {"200": _resp("account", {"$ref": "#/components/schemas/Any"}), **_ADMIN_ERRORS}}},
            "/admin/accounts/{id}/keys": {
                "post": {"operationId": "issueKey", "security": [{"adminToken": []}], "parameters": [account_id],
                         "responses": {"201": _resp("new key", {"$ref": "#/components/schemas/Any"}),
                                       **_ADMIN_ERRORS}},
                "get": {"operationId": "listKeys", "security": [{"adminToken": []}], "parameters": [account_id],
                        "responses": {"200": _resp("keys", {"$ref": "#/components/schemas/Any"}),
                                      **_ADMIN_ERRORS}}},
            "/admin/keys/{id}/revoke": {"post": {
                "operationId": "revokeKey", "security": [{"adminToken": []}], "parameters": [account_id],
                "responses": {"200": _resp("revoked", {"$ref": "#/components/schemas/Any"}), **_ADMIN_ERRORS}}},
            "/admin/keys/{id}/rotate": {"post": {
                "operationId": "rotateKey", "security": [{"adminToken": []}], "parameters": [account_id],
                "responses": {"201": _resp("new key", {"$ref": "#/components/schemas/Any"}), **_ADMIN_ERRORS}}},
            "/admin/decisions": {
                "get": {"operationId": "listDecisions", "security": [{"adminToken": []}],
                        "parameters": [{"name": "target", "in": "query", "required": False, "schema": _ID},
                                       {"name": "active", "in": "query", "required": False,
                                        "schema": {"type": "string", "enum": ["true", "false"]}}],
                        "responses": {"200": _resp("decisions", {"$ref": "#/components/schemas/Any"}),
                                      **_ADMIN_ERRORS}},
                "post": {"operationId": "setDecision", "security": [{"adminToken": []}],
                         "requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/DecisionIn"}}}},
                         "responses": {"201": _resp("set", {"$ref": "#/components/schemas/Any"}),
                                       **_ADMIN_ERRORS}}},
            "/admin/decisions/{id}/clear": {"post": {
                "operationId": "clearDecision", "security": [{"adminToken": []}], "parameters": [account_id],
                "responses": {"200": _resp("cleared", {"$ref": "#/components/schemas/Any"}), **_ADMIN_ERRORS}}},
            "/admin/traffic": {"get": {
                "operationId": "traffic", "security": [{"adminToken": []}],
                "parameters": [{"name": "account_id", "in": "query", "required": False, "schema": _ID},
                               {"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
                "responses": {"200": _resp("records", {"$ref": "#/components/schemas/Any"}), **_ADMIN_ERRORS}}},
            "/admin/stats": {"get": {"operationId": "stats", "security": [{"adminToken": []}],
                                     "responses": {"200": _resp("state", {"$ref": "#/components/schemas/Any"}),
                                                   **_ADMIN_ERRORS}}},
            "/admin/detector": {"get": {"operationId": "detector", "security": [{"adminToken": []}],
                                        "responses": {"200": _resp("the loaded detector and its reloads",
                                                                   {"$ref": "#/components/schemas/Any"}),
                                                      **_ADMIN_ERRORS}}},
            "/admin/detector/reload": {"post": {
                "operationId": "reloadDetector", "security": [{"adminToken": []}],
                "responses": {"200": _resp("reloaded; its window rebuilt from the log",
                                           {"$ref": "#/components/schemas/Any"}),
                              **_ADMIN_ERRORS,
                              "409": _resp("no detector directory, no detector, or a reload already running"),
                              "422": _resp("the directory holds no fitted detector; the current one keeps scoring")}}},
        },
    }
