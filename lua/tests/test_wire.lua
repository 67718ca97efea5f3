-- Unit tests of pgs_wire.lua, the router's pure part, under a plain lua5.3:
--   lua5.3 lua/tests/test_wire.lua        (from the repository root)
-- Prints "N passed, 0 failed" and exits non-zero on any failure.

package.path = "lua/?.lua;lua/tests/lib/?.lua;" .. package.path
local wire = require("pgs_wire")

local H = require("harness")
local test, eq = H.test, H.eq

local function msg(code, payload)
    payload = payload or ""
    return string.pack(">I4I4", 8 + #payload, code) .. payload
end

test("classify names every startup-phase message", function()
    eq(wire.classify(msg(wire.CODE_SSL_REQUEST)), "ssl")
    eq(wire.classify(msg(wire.CODE_GSSENC_REQUEST)), "gssenc")
    eq(wire.classify(msg(wire.CODE_CANCEL_REQUEST, "12345678")), "cancel")
    eq(wire.classify(msg(3 << 16, "user\0a\0\0")), "startup")
    eq(wire.classify(msg(3 << 16 | 2, "user\0a\0\0")), "startup", "protocol 3.2")
    eq(wire.classify(msg(2 << 16, "xx")), "unsupported", "protocol 2")
    eq(wire.classify(string.pack(">I4I4", 7, 0)), "bad_length", "too short")
    eq(wire.classify(string.pack(">I4I4", 10001, 3 << 16)), "bad_length", "too long")
    eq(wire.classify(string.pack(">I4I4", 0xFFFFFFFF, 0)), "bad_length")
end)

test("a TLS handshake record is told apart from any valid length", function()
    -- A ClientHello starts 16 03 01 (record type handshake, TLS 1.0 record version).
    local kind, len = wire.classify("\22\3\1\2\0\1\0\1")
    eq(kind, "tls")
    assert(len > wire.MAX_MESSAGE_LEN, "as a length it is out of range")
end)

test("startup parameters are read exactly", function()
    local p = assert(wire.parse_startup_params("user\0acme\0database\0db\0\0"))
    eq(p.user, "acme"); eq(p.database, "db")
    local _, err = wire.parse_startup_params("user\0acme\0")
    eq(err.reason, "malformed_startup", "no final terminator")
    _, err = wire.parse_startup_params("user\0acme\0user\0b\0\0")
    eq(err.reason, "duplicate_user")
    _, err = wire.parse_startup_params("\0")
    eq(err, nil, "an empty list is valid")
    _, err = wire.parse_startup_params("user\0\0\0x\0\0")
    eq(err.reason, "malformed_startup", "an empty key")
    _, err = wire.parse_startup_params("")
    eq(err.reason, "malformed_startup")
end)

test("the tenant comes from a valid user only", function()
    local function startup(pairs) return msg(3 << 16, pairs) end
    local function tenant_of(m)
        local target, err = wire.startup_target(m)
        return target and target.tenant, err
    end
    eq(tenant_of(startup("user\0acme\0\0")), "acme")
    local _, err = tenant_of(startup("database\0x\0\0"))
    eq(err.reason, "missing_user"); eq(err.sqlstate, "28000")
    for _, bad in ipairs({ "ACME", "a-b", "1abc", "acme\1", string.rep("a", 64) }) do
        _, err = tenant_of(startup("user\0" .. bad .. "\0\0"))
        eq(err and err.reason, "invalid_user", bad)
    end
    eq(tenant_of(startup("user\0" .. string.rep("a", 63) .. "\0\0")), string.rep("a", 63))
end)

test("error responses are well-formed, with an optional hint", function()
    local e = wire.error_response("28000", "no", "try TLS")
    eq(e:sub(1, 1), "E")
    eq(string.unpack(">I4", e, 2), #e - 1, "length counts itself, not the type byte")
    assert(e:find("C28000\0", 1, true) and e:find("Mno\0", 1, true))
    assert(e:find("Htry TLS\0", 1, true), "hint field")
    assert(not wire.error_response("28000", "no"):find("H", 7, true), "no hint field")
    eq(e:sub(-2), "\0\0")
end)

test("client bytes are quoted for logs", function()
    eq(wire.quote_for_log(nil), "-")
    eq(wire.quote_for_log("a\nb\""), '"a\\x0ab\\x22"')
    eq(wire.quote_for_log(string.rep("x", 70)), '"' .. string.rep("x", 64) .. '"...')
end)

test("cancel requests name their key, for protocol 3.0 and 3.2 lengths", function()
    local pid = string.pack(">I4", 4242)
    eq(wire.cancel_key(msg(wire.CODE_CANCEL_REQUEST, pid .. "\1\2\3\4")), "0000109201020304")
    local long = msg(wire.CODE_CANCEL_REQUEST, pid .. string.rep("\255", 32))
    eq(wire.cancel_key(long), "00001092" .. string.rep("FF", 32), "3.2: 32-byte key")
    local _, err = wire.cancel_key(msg(wire.CODE_CANCEL_REQUEST, pid))
    eq(err.reason, "bad_cancel_length", "no key")
    _, err = wire.cancel_key(msg(wire.CODE_CANCEL_REQUEST, pid .. string.rep("x", 257)))
    eq(err.reason, "bad_cancel_length", "key over 256 bytes")
end)

test("BackendKeyData gives the same key a cancel presents", function()
    local body = string.pack(">I4", 4242) .. "\1\2\3\4"
    local k = "K" .. string.pack(">I4", 4 + #body) .. body
    eq(wire.server_message(k:sub(1, 5), 65536), "K")
    eq(select(2, wire.server_message(k:sub(1, 5), 65536)), #k, "total length")
    eq(wire.backend_key(k), wire.cancel_key(msg(wire.CODE_CANCEL_REQUEST, body)))
    eq(wire.backend_key("K" .. string.pack(">I4", 8) .. "\0\0\0\1"), nil, "no key")
    eq(wire.server_message("R" .. string.pack(">I4", 70000), 65536), nil, "too long")
    eq(wire.server_message("R" .. string.pack(">I4", 3), 65536), nil, "too short")
end)

test("an ErrorResponse's SQLSTATE is found", function()
    local e = wire.error_response("28P01", "password authentication failed")
    eq(wire.error_code(e), "28P01")
    eq(wire.error_code("Sxx"), nil)
end)

test("the agent's answer to a wake says whether and why not", function()
    local o = wire.wake_outcome({ status = 200, body = "awake queued_ms=0 total_ms=140\n" })
    eq(o.woke, true)
    eq(o.detail, '"awake\\x20queued_ms=0\\x20total_ms=140"', "detail is quoted")
    o = wire.wake_outcome({ status = 503, body = "timeout the server did not accept logins\n" })
    eq(o.woke, false)
    eq(o.reason, "timeout")
    eq(wire.wake_outcome({ status = 503, body = "start_failed no container" }).reason, "start_failed")
    eq(wire.wake_outcome({ status = 503, body = "not_allowed acme is disabled" }).reason, "not_allowed")
    -- Anything else is not the agent speaking: never trust it.
    eq(wire.wake_outcome({ status = 200, body = "hello" }).reason, "agent_error")
    eq(wire.wake_outcome({ status = 502, body = "" }).reason, "agent_error")
    eq(wire.wake_outcome({ status = 404, body = "" }).reason, "agent_error")
    -- HAProxy's own 503 when nothing listens on the wake socket.
    eq(wire.wake_outcome({ status = 503, body = "<html>503 Service Unavailable" }).reason,
       "agent_unreachable")
    -- No answer at all (no socket, timeout): core.httpclient gives status 0 or nothing.
    eq(wire.wake_outcome(nil).reason, "agent_unreachable")
    eq(wire.wake_outcome({ status = 0 }).reason, "agent_unreachable")
    eq(wire.wake_outcome({}).reason, "agent_unreachable")
end)

test("57P03 is what a client of a server that cannot start yet gets", function()
    local e = wire.error_response(wire.SQLSTATE_CANNOT_CONNECT_NOW,
                                  "the database system is starting up")
    eq(wire.error_code(e), "57P03")
end)

H.finish()
