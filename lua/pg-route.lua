--[[
pg-route.lua -- pgs tenant routing for HAProxy 2.6 (Lua 5.3), TCP mode.

Reads the PostgreSQL startup phase of a client connection, picks the tenant
from the StartupMessage `user`, and lets haproxy.cfg route on it.  Everything
the client is refused with is a PostgreSQL ErrorResponse (severity FATAL), so
psql prints "FATAL:  <message>".

Actions (use in a `mode tcp` frontend with `tcp-request inspect-delay`):

  tcp-request content lua.pgs_route
      Reads at most: one SSLRequest, one GSSENCRequest (either order) and then
      one StartupMessage or CancelRequest.  Every message is
      int32 length (big-endian, includes itself) + int32 code + payload.
      * SSLRequest / GSSENCRequest: the 8 bytes are removed from the request
        buffer and 'N' (no encryption) is answered; reading continues.
        Refused (08P01): length != 8, a second request of the same kind, or
        any byte already pipelined behind it (plaintext injected before the
        TLS decision, the CVE-2021-23214 class).
      * CancelRequest: not supported; the connection is closed without any
        reply (like the postmaster, which never answers a cancel) and logged.
      * StartupMessage, protocol 3.x: key/value pairs, each NUL-terminated,
        plus a final NUL that must be the last byte (08P01 otherwise; also
        08P01 for a duplicated `user`).  `user` missing or empty -> 28000;
        not matching ^[a-z][a-z0-9_]{0,62}$ -> 28000.
        On success sets txn.pgs_tenant = user and returns, leaving the
        StartupMessage untouched in the buffer: HAProxy forwards it as is.
      * Any length outside 8..10000, or any other code (protocol 2, garbage)
        -> 08P01.
      * Client closed / inspect-delay expired before a full message: no
        reply, logged as client_closed / startup_timeout; returns without
        setting txn.pgs_tenant, so the cfg `reject` rule closes it.
  tcp-request content lua.pgs_refuse <unknown|disabled>
      Tenant exists in no map / is not enabled.  The client gets the SAME
      error for both (28000, tenant "<t>" is not available): no enumeration.

Variables:
  txn.pgs_tenant  validated tenant (only set when the startup is acceptable).
  txn.pgs_reason  why the connection was refused (for a log-format).

Every refusal logs one line through the frontend's loggers (txn:log), e.g.
  pgs: refused tenant=acme reason=disabled
  pgs: refused tenant=- reason=invalid_user user="x\x0ay"
Client-supplied bytes are never logged raw (see quote_for_log).  HAProxy 2.6
also echoes every Lua log line to its own stderr as
"[notice] DDD/HHMMSS (pid) : pgs: refused ..." (only `quiet` stops that, and
`quiet` also detaches stderr, killing `log stderr`).

Counters: every refusal is counted in memory, by reason, and for reason
`disabled` also by tenant (a tenant in the backends map, so the keys stay
bounded; unknown names never become keys).  `pgs show refused` on the stats
socket prints them for the agent's /metrics; they restart at 0 on reload.
They rely on the shared Lua state of `lua-load` (one lock for all threads).

Rules: no I/O at request time, no global mutable state but the refusal
counters, bounded loops
(MAX_MESSAGES reads; the startup parser advances >= 2 bytes per pair).
A Lua runtime error becomes an XX000 ErrorResponse and closes the connection.
Beware: in HAProxy 2.6 an *uncaught* Lua error in an action just continues
with the next rule, so txn.pgs_tenant is set as the very last step of
pgs_route and only for a fully validated startup; the cfg
`reject unless { var(txn.pgs_tenant) -m found }` rule is the backstop.
]]

local string_unpack = string.unpack
local string_pack = string.pack

-- Protocol constants (PostgreSQL frontend/backend protocol v3).
local HEADER_LEN          = 8        -- int32 length + int32 code
local MIN_MESSAGE_LEN     = 8
local MAX_MESSAGE_LEN     = 10000    -- PostgreSQL's MAX_STARTUP_PACKET_LENGTH
local CANCEL_REQUEST_LEN  = 16
local CODE_CANCEL_REQUEST = 80877102 -- 1234 << 16 | 5678
local CODE_SSL_REQUEST    = 80877103 -- 1234 << 16 | 5679
local CODE_GSSENC_REQUEST = 80877104 -- 1234 << 16 | 5680
local PROTOCOL_MAJOR_3    = 3
local NO_ENCRYPTION_REPLY = "N"
-- One SSLRequest + one GSSENCRequest + the StartupMessage/CancelRequest.
local MAX_MESSAGES        = 3

-- SQLSTATEs.
local SQLSTATE_PROTOCOL_VIOLATION = "08P01"
local SQLSTATE_INVALID_AUTH_SPEC  = "28000"
local SQLSTATE_INTERNAL_ERROR     = "XX000"

-- Tenant names: lowercase, 1..63 chars (PostgreSQL NAMEDATALEN - 1).
local TENANT_PATTERN    = "^[a-z][a-z0-9_]*$"
local TENANT_MAX_LEN    = 63
local LOG_VALUE_MAX_LEN = 64

local VAR_TENANT = "txn.pgs_tenant"
local VAR_REASON = "txn.pgs_reason"

local MSG_NOT_AVAILABLE = 'tenant "%s" is not available'
local MSG_INVALID_USER  = "invalid user name: must be 1 to 63 characters, " ..
                          "lowercase letters, digits or underscores, " ..
                          "starting with a letter"

---------------------------------------------------------------------------
-- Helpers
---------------------------------------------------------------------------

-- Quote client-controlled bytes for a log line: printable ASCII except
-- backslash and double quote is kept, everything else becomes \xNN.
local function quote_for_log(s)
    if s == nil then
        return "-"
    end
    local truncated = #s > LOG_VALUE_MAX_LEN
    if truncated then
        s = s:sub(1, LOG_VALUE_MAX_LEN)
    end
    local escaped = s:gsub("[^%w%-%._~:/@+=,]", function(c)
        return string.format("\\x%02x", c:byte())
    end)
    return '"' .. escaped .. '"' .. (truncated and "..." or "")
end

-- PostgreSQL ErrorResponse: 'E', int32 length, fields S/V/C/M, final NUL.
local function error_response(sqlstate, message)
    local body = "SFATAL\0" .. "VFATAL\0" ..
                 "C" .. sqlstate .. "\0" ..
                 "M" .. message .. "\0" .. "\0"
    return "E" .. string_pack(">I4", #body + 4) .. body
end

-- A refusal: what the client is told and what is logged.
local function refusal(reason, sqlstate, message, tenant, detail)
    return { reason = reason, sqlstate = sqlstate, message = message,
             tenant = tenant, detail = detail }
end

local function protocol_violation(reason, message, detail)
    return refusal(reason, SQLSTATE_PROTOCOL_VIOLATION, message, nil, detail)
end

local function internal_error(lua_error)
    return refusal("internal_error", SQLSTATE_INTERNAL_ERROR,
        "internal error in connection router", nil,
        "error=" .. quote_for_log(tostring(lua_error)))
end

-- Refusal counts, "<tenant|-> <reason>" -> n (see Counters above).
local refused = {}

-- Log one line for a refusal (tenant is validated, detail already quoted)
-- and count it.
local function log_refusal(txn, r)
    local key = ((r.reason == "disabled" and r.tenant) or "-") .. " " .. r.reason
    refused[key] = (refused[key] or 0) + 1
    local line = string.format("pgs: refused tenant=%s reason=%s",
                               r.tenant or "-", r.reason)
    if r.detail then
        line = line .. " " .. r.detail
    end
    txn:log(core.notice, line)
end

-- Log, tell the client (unless r.sqlstate is nil) and close.  Must be called
-- outside pcall: txn:done() unwinds with a Lua error.
local function refuse(txn, r)
    txn:set_var(VAR_REASON, r.reason)
    log_refusal(txn, r)
    if r.sqlstate then
        txn.res:send(error_response(r.sqlstate, r.message))
    end
    txn:done()
end

-- Exactly `len` bytes at `offset` of the request's input; waits (yields) for
-- them.  nil when the client closed or the inspect-delay expired first.
local function read_exact(txn, offset, len)
    local data = txn.req:data(offset, len)
    if data == nil or #data < len then
        return nil
    end
    return data
end

---------------------------------------------------------------------------
-- StartupMessage
---------------------------------------------------------------------------

-- Parse "key\0value\0...key\0value\0\0" exactly as the postmaster does.
-- Returns a table of parameters, or nil and a refusal.
local function parse_startup_params(payload)
    local last = #payload          -- index of the terminating NUL
    if last == 0 or payload:byte(last) ~= 0 then
        return nil, protocol_violation("malformed_startup",
            "invalid startup packet layout: expected terminator as last byte")
    end
    local params = {}
    local pos = 1
    while pos < last do            -- each pair consumes >= 2 bytes
        local key_end = payload:find("\0", pos, true)
        if key_end == pos or key_end >= last then
            return nil, protocol_violation("malformed_startup",
                "invalid startup packet layout: expected terminator as last byte")
        end
        local value_end = payload:find("\0", key_end + 1, true)
        if value_end >= last then
            return nil, protocol_violation("malformed_startup",
                "invalid startup packet layout: expected terminator as last byte")
        end
        local key = payload:sub(pos, key_end - 1)
        if params[key] ~= nil and key == "user" then
            return nil, protocol_violation("duplicate_user",
                'invalid startup packet layout: duplicate "user" parameter')
        end
        params[key] = payload:sub(key_end + 1, value_end - 1)
        pos = value_end + 1
    end
    return params
end

local function is_valid_tenant(user)
    return #user <= TENANT_MAX_LEN and user:find(TENANT_PATTERN) ~= nil
end

-- Returns the tenant, or nil and a refusal (or nil, nil when incomplete).
local function handle_startup(txn, len)
    local message = read_exact(txn, 0, len)
    if not message then
        return nil, nil
    end
    local params, err = parse_startup_params(message:sub(HEADER_LEN + 1))
    if not params then
        return nil, err
    end
    local user = params["user"]
    if user == nil or user == "" then
        return nil, refusal("missing_user", SQLSTATE_INVALID_AUTH_SPEC,
            "no PostgreSQL user name specified in startup packet")
    end
    if not is_valid_tenant(user) then
        return nil, refusal("invalid_user", SQLSTATE_INVALID_AUTH_SPEC,
            MSG_INVALID_USER, nil, "user=" .. quote_for_log(user))
    end
    return user
end

---------------------------------------------------------------------------
-- SSLRequest / GSSENCRequest
---------------------------------------------------------------------------

local ENCRYPTION_REQUESTS = {
    [CODE_SSL_REQUEST]    = { name = "SSL",    seen_key = "ssl" },
    [CODE_GSSENC_REQUEST] = { name = "GSSENC", seen_key = "gssenc" },
}

-- Answer 'N' to an encryption request.  Returns a refusal or nil.
local function handle_encryption_request(txn, len, kind, seen)
    if len ~= HEADER_LEN then
        return protocol_violation("bad_length", "invalid length of startup packet",
            "length=" .. len)
    end
    if seen[kind.seen_key] then
        return protocol_violation("duplicate_" .. kind.seen_key,
            "duplicate " .. kind.name .. " negotiation request")
    end
    -- Nothing may follow before our answer: a client waits for it.
    if txn.req:input() > HEADER_LEN then
        return protocol_violation("pipelined_after_" .. kind.seen_key,
            "received unencrypted data after " .. kind.name .. " request",
            "pipelined_bytes=" .. (txn.req:input() - HEADER_LEN))
    end
    seen[kind.seen_key] = true
    txn.req:remove(0, HEADER_LEN)
    txn.res:send(NO_ENCRYPTION_REPLY)
    return nil
end

---------------------------------------------------------------------------
-- pgs_route
---------------------------------------------------------------------------

-- Returns: tenant | nil, refusal | nil, nil (incomplete: let cfg reject).
local function route(txn)
    local seen = {}
    for _ = 1, MAX_MESSAGES do
        local header = read_exact(txn, 0, HEADER_LEN)
        if not header then
            return nil, nil
        end
        local len, code = string_unpack(">I4I4", header)
        if len < MIN_MESSAGE_LEN or len > MAX_MESSAGE_LEN then
            return nil, protocol_violation("bad_length",
                "invalid length of startup packet", "length=" .. len)
        end
        local kind = ENCRYPTION_REQUESTS[code]
        if kind then
            local err = handle_encryption_request(txn, len, kind, seen)
            if err then
                return nil, err
            end
        elseif code == CODE_CANCEL_REQUEST then
            local r = refusal("cancel_unsupported", nil, nil, nil,
                              "length=" .. len)
            return nil, r
        elseif (code >> 16) == PROTOCOL_MAJOR_3 then
            return handle_startup(txn, len)
        else
            return nil, protocol_violation("unsupported_protocol",
                string.format("unsupported frontend protocol %d.%d: " ..
                              "server supports 3.0 to 3.0",
                              code >> 16, code & 0xFFFF),
                string.format("code=0x%08x", code))
        end
    end
    -- A third message that is neither startup nor cancel is caught above
    -- (duplicate request); this is only reachable if that logic changes.
    return nil, protocol_violation("too_many_messages",
        "too many startup negotiation messages")
end

local function pgs_route(txn)
    local ok, tenant, err = pcall(route, txn)
    if not ok then
        return refuse(txn, internal_error(tenant))  -- `tenant` is the error
    end
    if tenant then
        txn:set_var(VAR_TENANT, tenant)
        return
    end
    if err then
        return refuse(txn, err)
    end
    -- Incomplete: client closed or inspect-delay expired.  No reply; the
    -- cfg `reject unless { var(txn.pgs_tenant) -m found }` closes it.
    -- A short read with the channel still able to receive means the
    -- inspect-delay ran out; otherwise the client closed its side.
    local reason = txn.req:may_recv() and "startup_timeout" or "client_closed"
    txn:set_var(VAR_REASON, reason)
    log_refusal(txn, refusal(reason, nil, nil, nil,
        "buffered=" .. tostring(txn.req:input())))
end

---------------------------------------------------------------------------
-- pgs_refuse <reason>
---------------------------------------------------------------------------

local REFUSE_REASONS = { unknown = true, disabled = true }

local function tenant_refusal(txn, reason)
    local tenant = txn:get_var(VAR_TENANT)
    if type(tenant) ~= "string" or not is_valid_tenant(tenant) then
        tenant = nil    -- cannot happen behind pgs_route; never echo junk
    end
    if not REFUSE_REASONS[reason] then
        reason = "unknown"
    end
    return refusal(reason, SQLSTATE_INVALID_AUTH_SPEC,
        string.format(MSG_NOT_AVAILABLE, tenant or "?"), tenant)
end

local function pgs_refuse(txn, reason)
    local ok, r = pcall(tenant_refusal, txn, reason)
    if not ok then
        r = internal_error(r)
    end
    return refuse(txn, r)
end

-- `pgs show refused`: a header line, then "<tenant|-> <reason> <count>" lines.
local function show_refused(applet)
    applet:send("# pgs refused: tenant reason count\n")
    for key, n in pairs(refused) do
        applet:send(string.format("%s %d\n", key, n))
    end
end

core.register_cli({ "pgs", "show", "refused" },
    "pgs show refused : refused connections by tenant and reason", show_refused)
core.register_action("pgs_route", { "tcp-req" }, pgs_route, 0)
core.register_action("pgs_refuse", { "tcp-req" }, pgs_refuse, 1)
