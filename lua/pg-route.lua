--[[
pg-route.lua -- pgs tenant routing for HAProxy 2.6 (Lua 5.3), TCP mode.

Reads the PostgreSQL startup phase of a client connection, picks the tenant
from the StartupMessage `user`, and lets haproxy.cfg route on it.  Everything
the client is refused with is a PostgreSQL ErrorResponse (severity FATAL), so
psql prints "FATAL:  <message>".  The wire format (pure, unit-tested under a
plain lua5.3) lives in pgs_wire.lua, loaded with `require` through the
`lua-prepend-path` the rendered config sets.

Actions (use in a `mode tcp` frontend with `tcp-request inspect-delay`):

  tcp-request content lua.pgs_route <plain|optional|required|inside>
      Reads at most: one SSLRequest, one GSSENCRequest (either order) and then
      one StartupMessage or CancelRequest.  Every message is
      int32 length (big-endian, includes itself) + int32 code + payload.
      The argument says what the frontend offers:
        plain     no TLS: SSLRequest and GSSENCRequest are answered 'N'.
        optional  TLS terminated by HAProxy: SSLRequest is answered 'S' and
                  txn.pgs_via=starttls is set; a TLS handshake as the very
                  first byte (PostgreSQL 17's direct SSL) sets
                  txn.pgs_via=direct.  The cfg then waits for the whole
                  ClientHello and loops the stream into the internal TLS
                  listener, where this action runs again with `inside`.
                  Plaintext startups are routed (txn.pgs_via=plain).
        required  as optional, but a plaintext StartupMessage is refused
                  (28000, encryption required) before any tenant lookup.
        inside    on the decrypted stream: any SSLRequest or GSSENCRequest
                  is a protocol violation (08P01).
      * SSLRequest / GSSENCRequest: refused (08P01) when length != 8, a
        second request of the same kind, or any byte already pipelined
        behind it (plaintext injected before the TLS decision, the
        CVE-2021-23214 class).  GSSENCRequest is always answered 'N'.
      * CancelRequest (16 bytes in protocol 3.0, up to 12 + 256 in 3.2): sets
        txn.pgs_cancel_key to the hex of its pid and secret and returns; the
        cfg routes it to the server whose BackendKeyData issued that key (the
        stick table pgs-cancel-keys), drops it unanswered otherwise (like the
        postmaster, which never answers a cancel), and rate-limits cancels
        per source.  Allowed in every mode: libpq before 17 sends cancels
        unencrypted, and the key is the secret.
      * StartupMessage, protocol 3.x: key/value pairs, each NUL-terminated,
        plus a final NUL that must be the last byte (08P01 otherwise; also
        08P01 for a duplicated `user`).  `user` missing or empty -> 28000;
        `user` is `tenant` or `role.tenant` (split on the last dot), each
        part matching ^[a-z][a-z0-9_]{0,62}$, else 28000.
        On success sets txn.pgs_tenant and txn.pgs_role and returns.  A
        plain `tenant` leaves the StartupMessage untouched in the buffer;
        for `role.tenant` it is replaced (Channel:set) by one with
        user=role, and database=tenant where the client left it to libpq's
        default (database = the user as typed) or sent none.
      * Any length outside 8..10000, or any other code (protocol 2, garbage)
        -> 08P01.
      * Client closed / inspect-delay expired before a full message: no
        reply, logged as client_closed / startup_timeout; returns without
        setting txn.pgs_tenant, so the cfg `reject` rule closes it.
      HAProxy re-runs the whole `tcp-request content` list while a later rule
      waits for data (the ClientHello after 'S'), so the action decides once
      per connection and returns at once when called again.
  tcp-response content lua.pgs_capture   (tenant backends)
      Reads the server's first messages, forwarding each at once, until
      BackendKeyData: its key goes to txn.pgs_issued_key, which the cfg's
      `stick store-response` records with the server's id.  An
      ErrorResponse 28P01/28000 (wrong password) counts as a failed startup.
  tcp-request content lua.pgs_refuse <unknown|disabled|tls_required|sni_mismatch|too_many_connections|too_many_failures>
      unknown, disabled, tls_required: the tenant exists in no map / is not
      enabled / requires TLS and this session is plaintext.
      too_many_connections: the tenant is at its session limit (53300, the
      code drivers and pools retry on).  too_many_failures: this source had
      too many failed startups lately (28000).  The client gets
      the SAME error for all three (28000, tenant "<t>" is not available),
      with one hint on plaintext sessions where TLS is offered: no
      enumeration.  sni_mismatch: the TLS server name is in the tenant domain
      but names another tenant (28000); checked before any map lookup.

  tcp-request content lua.pgs_wake <agent socket> <timeout ms>   (tenant backends)
      For a tenant in the asleep map: holds the client (its startup packet
      stays buffered) while the agent starts the server, then routing goes
      on (txn.pgs_woke).  Failure, the agent's deadline, or no agent at all:
      FATAL 57P03 "the database system is starting up", logged as
      wake_<reason> (not_allowed, start_failed, timeout, agent_unreachable,
      agent_error).  The backend's inspect-delay exceeds the timeout.

Variables:
  txn.pgs_tenant  validated tenant (only set when the startup is acceptable).
  txn.pgs_role    the role the server sees (the tenant itself without a dot).
  txn.pgs_reason  why the connection was refused (for a log-format).
  txn.pgs_via     plain | starttls | direct: how the client negotiated, on
                  the public frontend (for the cfg and the log-format).
  txn.pgs_hint_tls  set on a plaintext session where TLS is offered.
  txn.pgs_cancel_key  a CancelRequest's key (hex of pid and secret).
  txn.pgs_issued_key  the key a server's BackendKeyData issued (same form).
Failed startups (see FAILED_STARTUP) increment the general purpose counter 0
of the source address the cfg tracks in stick counter 1.

Every refusal logs one line through the frontend's loggers (txn:log), e.g.
  pgs: refused tenant=acme reason=disabled
  pgs: refused tenant=- reason=invalid_user user="x\x0ay"
Client-supplied bytes are never logged raw (see quote_for_log).  HAProxy 2.6
also echoes every Lua log line to its own stderr as
"[notice] DDD/HHMMSS (pid) : pgs: refused ..." (only `quiet` stops that, and
`quiet` also detaches stderr, killing `log stderr`).

Counters: every refusal is counted in memory, by reason, and for reason
`disabled` also by tenant (a tenant in the backends map, so the keys stay
bounded; unknown names never become keys); every connection on the public
frontend is counted by how it negotiated (plain, starttls, direct).
`pgs show refused` and `pgs show negotiations` on the stats socket print
them for the agent's /metrics; they restart at 0 on reload.  They rely on
the shared Lua state of `lua-load` (one lock for all threads).

Rules: no I/O at request time, no global mutable state but the counters,
bounded loops (MAX_MESSAGES reads; the startup parser advances >= 2 bytes per
pair).  A Lua runtime error becomes an XX000 ErrorResponse and closes the
connection.  Beware: in HAProxy 2.6 an *uncaught* Lua error in an action just
continues with the next rule, so txn.pgs_tenant is set as the very last step
of pgs_route and only for a fully validated startup; the cfg
`reject unless { var(txn.pgs_tenant) -m found }` rule is the backstop.
]]

local wire = require("pgs_wire")

local HEADER_LEN = wire.HEADER_LEN
-- One SSLRequest + one GSSENCRequest + the StartupMessage/CancelRequest.
local MAX_MESSAGES = 3

local VAR_TENANT   = "txn.pgs_tenant"
local VAR_ROLE     = "txn.pgs_role"
local VAR_REASON   = "txn.pgs_reason"
local VAR_VIA      = "txn.pgs_via"
local VAR_HINT_TLS = "txn.pgs_hint_tls"
local VAR_CANCEL   = "txn.pgs_cancel_key"   -- a CancelRequest's key
local VAR_ISSUED   = "txn.pgs_issued_key"   -- the key a server's BackendKeyData issued
local VAR_WOKE     = "txn.pgs_woke"         -- the agent woke this tenant's server

local MODES = { plain = true, optional = true, required = true, inside = true }

local MSG_NOT_AVAILABLE = 'tenant "%s" is not available'
local HINT_USE_TLS = "A tenant may accept only encrypted connections: " ..
                     "connect with sslmode=require."
local MSG_ENCRYPTION_REQUIRED = "encryption required: this server accepts " ..
                                "only TLS connections (connect with sslmode=require)"

local function internal_error(lua_error)
    return wire.refusal("internal_error", wire.SQLSTATE_INTERNAL_ERROR,
        "internal error in connection router", nil,
        "error=" .. wire.quote_for_log(tostring(lua_error)))
end

---------------------------------------------------------------------------
-- Counters (see Counters above)
---------------------------------------------------------------------------

-- "<tenant|-> <reason>" -> n
local refused = {}
-- "plain" | "starttls" | "direct" -> n
local negotiations = { plain = 0, starttls = 0, direct = 0 }

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

-- Refusals that count as a failed startup of the client's address (the
-- cfg tracks it in stick counter 1 and throttles past a threshold).  A
-- timeout, a closed client, a throttled one or a busy tenant is no failure.
local FAILED_STARTUP = {
    bad_length = true, malformed_startup = true, duplicate_user = true,
    missing_user = true, invalid_user = true, unsupported_protocol = true,
    unknown = true, disabled = true, tls_required = true, sni_mismatch = true,
    bad_cancel_length = true, encryption_required = true,
    pipelined_after_ssl = true, pipelined_after_gssenc = true,
    duplicate_ssl = true, duplicate_gssenc = true,
    ssl_request_inside_tls = true, gssenc_request_inside_tls = true,
    too_many_messages = true,
}

-- Counts a failed startup against the client's address (no-op when the
-- session tracks no counter 1).
local function count_failure(txn)
    pcall(function() return txn.f:sc1_inc_gpc0() end)
end

-- Log, tell the client (unless r.sqlstate is nil) and close.  Must be called
-- outside pcall: txn:done() unwinds with a Lua error.
local function refuse(txn, r)
    txn:set_var(VAR_REASON, r.reason)
    if FAILED_STARTUP[r.reason] then
        count_failure(txn)
    end
    log_refusal(txn, r)
    if r.sqlstate then
        txn.res:send(wire.error_response(r.sqlstate, r.message, r.hint))
    end
    txn:done()
end

---------------------------------------------------------------------------
-- Reading the startup phase
---------------------------------------------------------------------------

-- Exactly `len` bytes at `offset` of the request's input; waits (yields) for
-- them.  nil when the client closed or the inspect-delay expired first.
local function read_exact(txn, offset, len)
    local data = txn.req:data(offset, len)
    if data == nil or #data < len then
        return nil
    end
    return data
end

local ENCRYPTION_REQUESTS = { ssl = "SSL", gssenc = "GSSENC" }

-- Checks an SSLRequest/GSSENCRequest before it is answered.  Returns a
-- refusal or nil.
local function check_encryption_request(txn, len, kind, seen, mode)
    local name = ENCRYPTION_REQUESTS[kind]
    if mode == "inside" then
        return wire.protocol_violation(kind .. "_request_inside_tls",
            "received " .. name .. " request inside an encrypted connection")
    end
    if len ~= HEADER_LEN then
        return wire.protocol_violation("bad_length",
            "invalid length of startup packet", "length=" .. len)
    end
    if seen[kind] then
        return wire.protocol_violation("duplicate_" .. kind,
            "duplicate " .. name .. " negotiation request")
    end
    -- Nothing may follow before our answer: a client waits for it.
    if txn.req:input() > HEADER_LEN then
        return wire.protocol_violation("pipelined_after_" .. kind,
            "received unencrypted data after " .. name .. " request",
            "pipelined_bytes=" .. (txn.req:input() - HEADER_LEN))
    end
    return nil
end

local function offers_tls(mode)
    return mode == "optional" or mode == "required"
end

-- Reads the StartupMessage of length `len`.  Returns a decision, or nil and
-- a refusal (or nil, nil when incomplete).
local function handle_startup(txn, len, mode)
    if mode == "required" then
        negotiations.plain = negotiations.plain + 1
        return nil, wire.refusal("encryption_required",
            wire.SQLSTATE_INVALID_AUTH_SPEC, MSG_ENCRYPTION_REQUIRED)
    end
    local message = read_exact(txn, 0, len)
    if not message then
        return nil, nil
    end
    if mode ~= "inside" then
        negotiations.plain = negotiations.plain + 1
    end
    local target, err = wire.startup_target(message)
    if not target then
        return nil, err
    end
    if target.message and txn.req:set(target.message, 0, len) < 0 then
        error("cannot rewrite the StartupMessage for role " .. target.role)
    end
    return { tenant = target.tenant, role = target.role,
             via = (mode ~= "inside") and "plain" or nil }
end

-- Reads a CancelRequest of length `len`: the decision names its key, which
-- the cfg looks up in the table of keys servers issued.  Allowed in every
-- mode (libpq before 17 sends cancels unencrypted; the key is the secret).
local function handle_cancel(txn, len)
    local message = read_exact(txn, 0, math.min(len, wire.CANCEL_MAX_LEN + 1))
    if not message then
        return nil, nil
    end
    local key, err = wire.cancel_key(message)
    if not key then
        return nil, err
    end
    return { cancel = key }
end

-- Returns: a decision {tenant=, via=} | nil, refusal | nil, nil (incomplete:
-- let the cfg reject).
local function route(txn, mode)
    local seen = {}
    for i = 1, MAX_MESSAGES do
        local header = read_exact(txn, 0, HEADER_LEN)
        if not header then
            return nil, nil
        end
        local kind, len, code = wire.classify(header)
        if kind == "tls" then
            if offers_tls(mode) and i == 1 then
                negotiations.direct = negotiations.direct + 1
                return { via = "direct" }
            end
            kind = "bad_length"   -- 0x16 as a length's first byte: > 10000
        end
        if kind == "bad_length" then
            return nil, wire.protocol_violation("bad_length",
                "invalid length of startup packet", "length=" .. len)
        elseif kind == "ssl" or kind == "gssenc" then
            local err = check_encryption_request(txn, len, kind, seen, mode)
            if err then
                return nil, err
            end
            seen[kind] = true
            txn.req:remove(0, HEADER_LEN)
            if kind == "ssl" and offers_tls(mode) then
                -- Sent at once, before any server connection; the client
                -- starts its TLS handshake on this connection.
                txn.res:send("S")
                negotiations.starttls = negotiations.starttls + 1
                return { via = "starttls" }
            end
            txn.res:send("N")
        elseif kind == "cancel" then
            return handle_cancel(txn, len)
        elseif kind == "startup" then
            return handle_startup(txn, len, mode)
        else
            return nil, wire.protocol_violation("unsupported_protocol",
                string.format("unsupported frontend protocol %d.%d: " ..
                              "server supports 3.0 to 3.0",
                              code >> 16, code & 0xFFFF),
                string.format("code=0x%08x", code))
        end
    end
    -- A third message that is neither startup nor cancel is caught above
    -- (duplicate request); this is only reachable if that logic changes.
    return nil, wire.protocol_violation("too_many_messages",
        "too many startup negotiation messages")
end

-- Whether this connection was decided by an earlier run of the rule list.
local function decided(txn)
    return txn:get_var(VAR_TENANT) ~= nil or txn:get_var(VAR_VIA) ~= nil
        or txn:get_var(VAR_REASON) ~= nil or txn:get_var(VAR_CANCEL) ~= nil
end

local function pgs_route(txn, mode)
    if decided(txn) then
        return
    end
    if not MODES[mode] then
        return refuse(txn, internal_error("unknown pgs_route mode"))
    end
    local ok, decision, err = pcall(route, txn, mode)
    if not ok then
        return refuse(txn, internal_error(decision))  -- `decision` is the error
    end
    if decision then
        if decision.via == "plain" and mode == "optional" then
            txn:set_var(VAR_HINT_TLS, true)
        end
        if decision.via then
            txn:set_var(VAR_VIA, decision.via)
        end
        if decision.cancel then
            txn:set_var(VAR_CANCEL, decision.cancel)
        end
        if decision.role then
            txn:set_var(VAR_ROLE, decision.role)
        end
        if decision.tenant then
            txn:set_var(VAR_TENANT, decision.tenant)
        end
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
    log_refusal(txn, wire.refusal(reason, nil, nil, nil,
        "buffered=" .. tostring(txn.req:input())))
end

---------------------------------------------------------------------------
-- pgs_refuse <reason>
---------------------------------------------------------------------------

-- Refusals that read the same to the client (no enumeration).
local NOT_AVAILABLE = { unknown = true, disabled = true, tls_required = true }

local MSG_SNI_MISMATCH = "the TLS server name (SNI) names another tenant " ..
                         "than the user name"
local MSG_TOO_MANY_CONNECTIONS = 'too many connections for tenant "%s"'
local MSG_TOO_MANY_FAILURES = "too many failed connection attempts"
local SQLSTATE_TOO_MANY_CONNECTIONS = "53300"

local function tenant_refusal(txn, reason)
    local tenant = txn:get_var(VAR_TENANT)
    if not wire.is_valid_tenant(tenant) then
        tenant = nil    -- cannot happen behind pgs_route; never echo junk
    end
    if reason == "sni_mismatch" then
        return wire.refusal(reason, wire.SQLSTATE_INVALID_AUTH_SPEC,
            MSG_SNI_MISMATCH, tenant)
    elseif reason == "too_many_connections" then
        -- Only reached for a known, enabled tenant: naming it tells nothing.
        return wire.refusal(reason, SQLSTATE_TOO_MANY_CONNECTIONS,
            string.format(MSG_TOO_MANY_CONNECTIONS, tenant or "?"), tenant)
    elseif reason == "too_many_failures" then
        return wire.refusal(reason, wire.SQLSTATE_INVALID_AUTH_SPEC,
            MSG_TOO_MANY_FAILURES)
    end
    if not NOT_AVAILABLE[reason] then
        reason = "unknown"
    end
    local r = wire.refusal(reason, wire.SQLSTATE_INVALID_AUTH_SPEC,
        string.format(MSG_NOT_AVAILABLE, tenant or "?"), tenant)
    if txn:get_var(VAR_HINT_TLS) then
        r.hint = HINT_USE_TLS
    end
    return r
end

local function pgs_refuse(txn, reason)
    local ok, r = pcall(tenant_refusal, txn, reason)
    if not ok then
        r = internal_error(r)
    end
    return refuse(txn, r)
end

---------------------------------------------------------------------------
-- pgs_capture (tcp-response, tenant backends)
---------------------------------------------------------------------------

-- The server's startup-phase messages before BackendKeyData: authentication
-- requests, ParameterStatus, notices.  A bound on the loop, not a protocol
-- limit.
local MAX_SERVER_MESSAGES = 100
local MAX_SERVER_MESSAGE_LEN = 65536

-- Reads the server's first messages, forwarding each complete one at once
-- (a SCRAM exchange would stall until the inspect-delay ends otherwise),
-- until BackendKeyData: its key goes to txn.pgs_issued_key for the cfg's
-- `stick store-response`.  An ErrorResponse with 28P01 (wrong password)
-- counts as a failed startup of the client's address.  Stops quietly at
-- ReadyForQuery, an error, anything unexpected, or the end of the delay.
local function capture(txn)
    for _ = 1, MAX_SERVER_MESSAGES do
        local header = txn.res:data(0, 5)
        if header == nil or #header < 5 then
            return
        end
        local kind, len = wire.server_message(header, MAX_SERVER_MESSAGE_LEN)
        if not kind then
            return
        end
        local message = txn.res:data(0, len)
        if message == nil or #message < len then
            return
        end
        if kind == "K" then
            local key = wire.backend_key(message)
            if key then
                txn:set_var(VAR_ISSUED, key)
            end
            return
        elseif kind == "E" then
            local code = wire.error_code(message)
            if code == "28P01" or code == "28000" then
                count_failure(txn)
            end
            return
        elseif kind == "Z" then
            return
        end
        txn.res:forward(len)
    end
end

local function pgs_capture(txn)
    if txn:get_var(VAR_CANCEL) ~= nil or txn:get_var(VAR_ISSUED) ~= nil then
        return
    end
    local ok, err = pcall(capture, txn)
    if not ok then
        txn:log(core.warning, "pgs: key capture failed: " ..
                wire.quote_for_log(tostring(err)))
    end
end

---------------------------------------------------------------------------
-- pgs_wake <agent socket> <timeout ms> (backends of managed tenants)
---------------------------------------------------------------------------

local MSG_STARTING_UP = "the database system is starting up"

-- Asks the agent on its local wake socket to start the tenant's server and
-- waits (yields) for the answer: the agent replies once the server accepts
-- logins, or with why not by its own deadline; `timeout_ms` is a backstop
-- past that deadline.
local function ask_agent(socket, tenant, timeout_ms)
    local client = core.httpclient()
    return client:post{ url = "http://pgs-agent/wake/" .. tenant,
                        dst = "unix@" .. socket, timeout = timeout_ms,
                        body = "" }
end

-- The cfg calls this for a tenant in the asleep map; the client's startup
-- packet stays buffered meanwhile.  Woken: sets txn.pgs_woke and routing
-- continues to the server.  Otherwise the client gets 57P03 FATAL (drivers
-- retry on it), and the log says why (wake_<reason>).
local function pgs_wake(txn, socket, timeout)
    local tenant = txn:get_var(VAR_TENANT)
    if not wire.is_valid_tenant(tenant) then
        return          -- cannot happen behind pgs_route; the cfg rejects
    end
    local ok, response = pcall(ask_agent, socket, tenant, tonumber(timeout))
    local outcome = wire.wake_outcome(ok and response or nil)
    if outcome.woke then
        txn:set_var(VAR_WOKE, 1)
        txn:log(core.info, "pgs: woke tenant=" .. tenant .. " " .. outcome.detail)
        return
    end
    local detail = outcome.detail
    if not ok then
        detail = "error=" .. wire.quote_for_log(tostring(response))
    end
    return refuse(txn, wire.refusal("wake_" .. outcome.reason,
        wire.SQLSTATE_CANNOT_CONNECT_NOW, MSG_STARTING_UP, tenant, detail))
end

---------------------------------------------------------------------------
-- Stats socket commands
---------------------------------------------------------------------------

-- `pgs show refused`: a header line, then "<tenant|-> <reason> <count>" lines.
local function show_refused(applet)
    applet:send("# pgs refused: tenant reason count\n")
    for key, n in pairs(refused) do
        applet:send(string.format("%s %d\n", key, n))
    end
end

-- `pgs show negotiations`: a header line, then "<via> <count>" lines.
local function show_negotiations(applet)
    applet:send("# pgs negotiations: via count\n")
    for _, via in ipairs({ "plain", "starttls", "direct" }) do
        applet:send(string.format("%s %d\n", via, negotiations[via]))
    end
end

core.register_cli({ "pgs", "show", "refused" },
    "pgs show refused : refused connections by tenant and reason", show_refused)
core.register_cli({ "pgs", "show", "negotiations" },
    "pgs show negotiations : new connections by how they negotiated TLS",
    show_negotiations)
core.register_action("pgs_route", { "tcp-req" }, pgs_route, 1)
core.register_action("pgs_refuse", { "tcp-req" }, pgs_refuse, 1)
core.register_action("pgs_capture", { "tcp-res" }, pgs_capture, 0)
core.register_action("pgs_wake", { "tcp-req" }, pgs_wake, 2)
