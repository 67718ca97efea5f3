--[[
pgs_wire.lua -- the pure part of pgs's router: PostgreSQL startup-phase wire
format (what a message is, how a StartupMessage's parameters are read, what a
refusal looks like on the wire).  No HAProxy API in here, so a plain `lua5.3`
runs its unit tests (lua/tests/test_wire.lua); pg-route.lua does the I/O.
]]

local M = {}

local string_unpack = string.unpack
local string_pack = string.pack

-- Protocol constants (PostgreSQL frontend/backend protocol v3).
M.HEADER_LEN          = 8        -- int32 length + int32 code
-- CancelRequest: length, code, int32 pid, then the secret key: 4 bytes in
-- protocol 3.0, up to 256 bytes in 3.2 (PostgreSQL 18).
M.CANCEL_MIN_LEN      = 16
M.MAX_KEY_LEN         = 256
M.CANCEL_MAX_LEN      = 12 + 256
M.MIN_MESSAGE_LEN     = 8
M.MAX_MESSAGE_LEN     = 10000    -- PostgreSQL's MAX_STARTUP_PACKET_LENGTH
M.CODE_CANCEL_REQUEST = 80877102 -- 1234 << 16 | 5678
M.CODE_SSL_REQUEST    = 80877103 -- 1234 << 16 | 5679
M.CODE_GSSENC_REQUEST = 80877104 -- 1234 << 16 | 5680
M.PROTOCOL_MAJOR_3    = 3
-- A TLS record of type handshake: the first byte of a direct TLS connection
-- (PostgreSQL 17's sslnegotiation=direct).  A startup length never starts
-- with it (lengths are at most 10000).
M.TLS_HANDSHAKE_BYTE  = 0x16

-- SQLSTATEs.
M.SQLSTATE_PROTOCOL_VIOLATION = "08P01"
M.SQLSTATE_INVALID_AUTH_SPEC  = "28000"
M.SQLSTATE_INTERNAL_ERROR     = "XX000"
M.SQLSTATE_CANNOT_CONNECT_NOW = "57P03"

-- Tenant names: lowercase, 1..63 chars (PostgreSQL NAMEDATALEN - 1).
local TENANT_PATTERN    = "^[a-z][a-z0-9_]*$"
local TENANT_MAX_LEN    = 63
local LOG_VALUE_MAX_LEN = 64

local MALFORMED = "invalid startup packet layout: expected terminator as last byte"

-- A refusal: what the client is told (sqlstate nil: nothing) and what is
-- logged (reason, tenant, detail).
function M.refusal(reason, sqlstate, message, tenant, detail)
    return { reason = reason, sqlstate = sqlstate, message = message,
             tenant = tenant, detail = detail }
end

function M.protocol_violation(reason, message, detail)
    return M.refusal(reason, M.SQLSTATE_PROTOCOL_VIOLATION, message, nil, detail)
end

-- Quote client-controlled bytes for a log line: printable ASCII except
-- backslash and double quote is kept, everything else becomes \xNN.
function M.quote_for_log(s)
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

-- PostgreSQL ErrorResponse: 'E', int32 length, fields S/V/C/M (and H when a
-- hint is given), final NUL.
function M.error_response(sqlstate, message, hint)
    local body = "SFATAL\0" .. "VFATAL\0" ..
                 "C" .. sqlstate .. "\0" ..
                 "M" .. message .. "\0" ..
                 (hint and ("H" .. hint .. "\0") or "") .. "\0"
    return "E" .. string_pack(">I4", #body + 4) .. body
end

function M.is_valid_tenant(name)
    return type(name) == "string" and #name <= TENANT_MAX_LEN
        and name:find(TENANT_PATTERN) ~= nil
end

-- Parse "key\0value\0...key\0value\0\0" exactly as the postmaster does.
-- Returns a table of parameters and the list of {key, value} pairs in the
-- order sent, or nil and a refusal.
function M.parse_startup_params(payload)
    local last = #payload          -- index of the terminating NUL
    if last == 0 or payload:byte(last) ~= 0 then
        return nil, M.protocol_violation("malformed_startup", MALFORMED)
    end
    local params, pairs_in_order = {}, {}
    local pos = 1
    while pos < last do            -- each pair consumes >= 2 bytes
        local key_end = payload:find("\0", pos, true)
        if key_end == pos or key_end >= last then
            return nil, M.protocol_violation("malformed_startup", MALFORMED)
        end
        local value_end = payload:find("\0", key_end + 1, true)
        if value_end >= last then
            return nil, M.protocol_violation("malformed_startup", MALFORMED)
        end
        local key = payload:sub(pos, key_end - 1)
        if params[key] ~= nil and key == "user" then
            return nil, M.protocol_violation("duplicate_user",
                'invalid startup packet layout: duplicate "user" parameter')
        end
        params[key] = payload:sub(key_end + 1, value_end - 1)
        pairs_in_order[#pairs_in_order + 1] = { key, params[key] }
        pos = value_end + 1
    end
    return params, nil, pairs_in_order
end

-- What the first 8 bytes of a startup-phase message are.  Returns a kind:
--   "tls"     a TLS handshake record (direct TLS); len and code are what
--             the bytes would mean as a message (a bad length, for callers
--             that do not offer TLS)
--   "ssl", "gssenc", "cancel", "startup" with len and code
--   "bad_length" or "unsupported" with len and code
function M.classify(header)
    local len, code = string_unpack(">I4I4", header)
    if header:byte(1) == M.TLS_HANDSHAKE_BYTE then
        return "tls", len, code
    end
    if len < M.MIN_MESSAGE_LEN or len > M.MAX_MESSAGE_LEN then
        return "bad_length", len, code
    end
    if code == M.CODE_SSL_REQUEST then
        return "ssl", len, code
    elseif code == M.CODE_GSSENC_REQUEST then
        return "gssenc", len, code
    elseif code == M.CODE_CANCEL_REQUEST then
        return "cancel", len, code
    elseif (code >> 16) == M.PROTOCOL_MAJOR_3 then
        return "startup", len, code
    end
    return "unsupported", len, code
end

-- Bytes as upper-case hex (cancel keys are table keys and log values).
function M.hex(s)
    return (s:gsub(".", function(c) return string.format("%02X", c:byte()) end))
end

-- The key a CancelRequest presents: hex of pid and secret, or nil and a
-- refusal.  `message` is the whole request.
function M.cancel_key(message)
    local len = #message
    if len < M.CANCEL_MIN_LEN or len > M.CANCEL_MAX_LEN then
        return nil, M.protocol_violation("bad_cancel_length",
            "invalid length of cancel request packet", "length=" .. len)
    end
    return M.hex(message:sub(M.HEADER_LEN + 1))
end

-- A server message's type byte and total length (type byte included), from
-- its first 5 bytes; nil when the length is impossible.
function M.server_message(header, max_len)
    local kind = header:sub(1, 1)
    local len = string_unpack(">I4", header, 2)
    if len < 4 or len > max_len then
        return nil
    end
    return kind, len + 1
end

-- The key a BackendKeyData ('K') message issues, in the form cancel_key
-- returns (hex of pid and secret); nil when malformed.
function M.backend_key(message)
    local key_len = #message - 9          -- 'K', int32 length, int32 pid
    if message:sub(1, 1) ~= "K" or key_len < 4 or key_len > M.MAX_KEY_LEN then
        return nil
    end
    return M.hex(message:sub(6))
end

-- The SQLSTATE of an ErrorResponse ('E') message, or nil.
function M.error_code(message)
    return message:match("%zC(%w%w%w%w%w)%z") or message:match("^E....C(%w%w%w%w%w)%z")
end

-- `role.tenant` user names (several roles per tenant).  Splits a user name
-- on its last dot; both parts must be valid names.  A name without a dot is
-- role and tenant at once (`acme` is role acme on tenant acme).  Returns
-- role, tenant, or nil when the name is not valid.
function M.split_user(user)
    local role, tenant = user:match("^(.*)%.([^.]*)$")
    if not role then
        role, tenant = user, user
    end
    if M.is_valid_tenant(role) and M.is_valid_tenant(tenant) then
        return role, tenant
    end
    return nil
end

-- The StartupMessage after the rewrite the server must see for a
-- `role.tenant` user: `user` becomes the role, and `database` becomes the
-- tenant when the client left it to libpq's default (the user name as
-- typed) or sent none (the server would default it to the role).  Every
-- other parameter is kept, in order.  Returns the new message, or nil and a
-- refusal when it would exceed the startup packet limit.
function M.rewrite_startup(code, pairs_in_order, typed_user, role, tenant)
    local out, has_database = {}, false
    for _, kv in ipairs(pairs_in_order) do
        local key, value = kv[1], kv[2]
        if key == "user" then
            value = role
        elseif key == "database" then
            has_database = true
            if value == typed_user then
                value = tenant
            end
        end
        out[#out + 1] = key .. "\0" .. value .. "\0"
    end
    if not has_database then
        out[#out + 1] = "database\0" .. tenant .. "\0"
    end
    local payload = table.concat(out) .. "\0"
    local len = M.HEADER_LEN + #payload
    if len > M.MAX_MESSAGE_LEN then
        return nil, M.protocol_violation("bad_length",
            "invalid length of startup packet", "length=" .. len)
    end
    return string_pack(">I4I4", len, code) .. payload
end

-- What a StartupMessage asks for: { tenant =, role =, message = } where
-- message is the rewritten StartupMessage to forward instead of the
-- client's (nil when the user named no role: forward it untouched).  Or
-- nil and a refusal.
function M.startup_target(message)
    local params, err, pairs_in_order =
        M.parse_startup_params(message:sub(M.HEADER_LEN + 1))
    if not params then
        return nil, err
    end
    local user = params["user"]
    if user == nil or user == "" then
        return nil, M.refusal("missing_user", M.SQLSTATE_INVALID_AUTH_SPEC,
            "no PostgreSQL user name specified in startup packet")
    end
    local role, tenant = M.split_user(user)
    if not role then
        return nil, M.refusal("invalid_user", M.SQLSTATE_INVALID_AUTH_SPEC,
            "invalid user name: must be a tenant, or role.tenant, each 1 to 63 " ..
            "characters, lowercase letters, digits or underscores, starting " ..
            "with a letter",
            nil, "user=" .. M.quote_for_log(user))
    end
    local target = { tenant = tenant, role = role }
    if role ~= user then
        local code = string_unpack(">I4", message, 5)
        target.message, err = M.rewrite_startup(code, pairs_in_order, user, role, tenant)
        if not target.message then
            return nil, err
        end
    end
    return target
end

-- The agent's answer to a wake (core.httpclient's response table, or nil
-- when the call failed): woke (boolean), reason (for the log: the first
-- word of a refusal's body, agent_unreachable when nothing came back or
-- HAProxy answered for it, agent_error for an answer that is not the
-- agent's), detail (the rest of
-- the body, quoted for the log).
local WAKE_REASONS = { not_allowed = true, start_failed = true, timeout = true }

function M.wake_outcome(response)
    if type(response) ~= "table" or type(response.status) ~= "number"
       or response.status == 0 then
        return { woke = false, reason = "agent_unreachable" }
    end
    local body = type(response.body) == "string" and response.body or ""
    if response.status == 200 and body:sub(1, 5) == "awake" then
        return { woke = true, detail = M.quote_for_log(body:gsub("%s+$", "")) }
    end
    local word, rest = body:match("^(%S+)%s*(.-)%s*$")
    if response.status == 503 and WAKE_REASONS[word] then
        return { woke = false, reason = word, detail = M.quote_for_log(rest) }
    end
    -- HAProxy's own 503 when nothing listens on the socket; anything else
    -- is not an answer the agent gives.
    local reason = response.status == 503 and "agent_unreachable" or "agent_error"
    return { woke = false, reason = reason,
             detail = "status=" .. tostring(response.status) }
end

return M
