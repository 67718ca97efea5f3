-- The few helpers the router's plain-lua5.3 unit tests share: named tests, an equality check
-- that says what differed, and the closing "N passed, N failed" line (non-zero exit on failure).
local H = { passed = 0, failed = 0 }

function H.test(name, f)
    local ok, err = pcall(f)
    if ok then
        H.passed = H.passed + 1
    else
        H.failed = H.failed + 1
        io.stderr:write("FAIL " .. name .. ": " .. tostring(err) .. "\n")
    end
end

function H.eq(got, want, what)
    if got ~= want then
        error(string.format("%s: got %q, want %q", what or "value",
                            tostring(got), tostring(want)), 2)
    end
end

function H.finish()
    print(string.format("%d passed, %d failed", H.passed, H.failed))
    os.exit(H.failed == 0 and 0 or 1)
end

return H
