-- Unit tests of the `role.tenant` rewrite in pgs_wire.lua, under a plain lua5.3:
--   lua5.3 lua/tests/test_roles.lua       (from the repository root)
-- Prints "N passed, 0 failed" and exits non-zero on any failure.

package.path = "lua/?.lua;lua/tests/lib/?.lua;" .. package.path
local wire = require("pgs_wire")

local H = require("harness")
local test, eq = H.test, H.eq

local PROTOCOL_3_0 = 3 << 16

local function startup(pairs, code)
    return string.pack(">I4I4", 8 + #pairs, code or PROTOCOL_3_0) .. pairs
end

-- The parameters of a StartupMessage, in order, as "k=v,k=v".
local function params_of(message)
    local len, code = string.unpack(">I4I4", message)
    eq(len, #message, "length field")
    local _, err, list = wire.parse_startup_params(message:sub(9))
    assert(list, err and err.message)
    local out = {}
    for _, kv in ipairs(list) do
        out[#out + 1] = kv[1] .. "=" .. kv[2]
    end
    return table.concat(out, ","), code
end

test("user names split on the last dot, both parts valid", function()
    local function split(u)
        local role, tenant = wire.split_user(u)
        return tostring(role) .. "|" .. tostring(tenant)
    end
    eq(split("alice.acme"), "alice|acme")
    eq(split("acme"), "acme|acme", "a plain tenant is its own role")
    eq(split("r_1.t_2"), "r_1|t_2")
    for _, bad in ipairs({ "a.b.c", ".acme", "alice.", "Alice.acme", "alice.Acme",
                           "a-b.acme", "1a.acme", "alice..acme", ".",
                           string.rep("a", 64) .. ".acme", "alice." .. string.rep("a", 64) }) do
        eq(split(bad), "nil|nil", bad)
    end
    eq(split(string.rep("r", 63) .. "." .. string.rep("t", 63)),
       string.rep("r", 63) .. "|" .. string.rep("t", 63), "63 + 63")
end)

test("a plain tenant's startup is forwarded untouched", function()
    local t = assert(wire.startup_target(startup("user\0acme\0database\0acme\0\0")))
    eq(t.tenant, "acme"); eq(t.role, "acme"); eq(t.message, nil)
end)

test("role.tenant: the server sees user=role, database defaulted to the tenant", function()
    -- What libpq sends when no dbname is given: database = the user as typed.
    local t = assert(wire.startup_target(startup(
        "user\0alice.acme\0database\0alice.acme\0application_name\0psql\0\0")))
    eq(t.tenant, "acme"); eq(t.role, "alice")
    eq(params_of(t.message), "user=alice,database=acme,application_name=psql")
end)

test("an explicit database is kept", function()
    local t = assert(wire.startup_target(startup("user\0alice.acme\0database\0sales\0\0")))
    eq(params_of(t.message), "user=alice,database=sales")
    t = assert(wire.startup_target(startup("database\0acme\0user\0alice.acme\0\0")))
    eq(params_of(t.message), "database=acme,user=alice", "order kept")
end)

test("no database at all: the tenant's, not the role's", function()
    local t = assert(wire.startup_target(startup("user\0reporting.acme\0options\0-c x=1\0\0")))
    eq(params_of(t.message), "user=reporting,options=-c x=1,database=acme")
end)

test("the protocol version is kept (3.2 too)", function()
    local t = assert(wire.startup_target(startup("user\0a.b\0\0", PROTOCOL_3_0 | 2)))
    local _, code = params_of(t.message)
    eq(code, PROTOCOL_3_0 | 2)
end)

test("bad user names are refused before any lookup, without echoing them raw", function()
    local _, err = wire.startup_target(startup("user\0a.b.c\0\0"))
    eq(err.reason, "invalid_user"); eq(err.sqlstate, "28000")
    eq(err.detail, 'user="a.b.c"')
    _, err = wire.startup_target(startup("user\0x\nroot.acme\0\0"))
    eq(err.reason, "invalid_user")
    eq(err.detail, 'user="x\\x0aroot.acme"')
    _, err = wire.startup_target(startup("database\0x\0\0"))
    eq(err.reason, "missing_user")
    _, err = wire.startup_target(startup("user\0a.b\0user\0c.d\0\0"))
    eq(err.reason, "duplicate_user")
end)

test("a rewrite that would outgrow the startup packet limit is refused", function()
    -- No database given: the rewrite adds one; fill the packet up to the limit first.
    local user = "user\0a.acme\0"
    local filler = string.rep("x", wire.MAX_MESSAGE_LEN - 8 - #user - 1 - 4)
    local pairs = user .. "o\0" .. filler .. "\0\0"
    local msg = startup(pairs)
    assert(#msg <= wire.MAX_MESSAGE_LEN, "the client's message is within the limit")
    local _, err = wire.startup_target(msg)
    eq(err and err.reason, "bad_length")
end)

H.finish()
