//! Wall-clock times as the backup commands speak them: seconds since the epoch, printed and
//! read as UTC (`2026-12-05 14:02:00+00`), without a calendar library.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    now_ms() / 1000
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number (`civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2026-12-05 14:02:00+00`.
pub fn format_utc(secs: i64) -> String {
    format_utc_ms(secs * 1000).replace(".000+", "+")
}

/// `2026-12-05 14:02:00.123+00`: the form pgBackRest's `--target` takes.
pub fn format_utc_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}+00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Reads `YYYY-MM-DD HH:MM[:SS[.fff]]` with `T` or a space between date and time, and an
/// optional zone (`Z`, `+HH`, `+HH:MM`, `-HHMM`; none means UTC). Returns milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let bad = || {
        format!(
            "{s:?} is not a time like \"2026-12-05 14:02:00+00\" or \"2026-12-05T14:02:00Z\" \
             (no zone means UTC)"
        )
    };
    let s = s.trim();
    let (date, rest) = s.split_at_checked(10).ok_or_else(bad)?;
    let num = |t: &str| -> Result<i64, String> {
        if t.is_empty() || !t.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        t.parse::<i64>().map_err(|_| bad())
    };
    let parts: Vec<&str> = date.split('-').collect();
    let [y, mo, d] = parts.as_slice() else {
        return Err(bad());
    };
    let (y, mo, d) = (num(y)?, num(mo)?, num(d)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    let rest = rest
        .strip_prefix('T')
        .or_else(|| rest.strip_prefix(' '))
        .ok_or_else(bad)?;
    // Split off the zone.
    let (clock, zone) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let offset_min = match zone {
        "" | "Z" | "z" => 0,
        z => {
            let sign = if z.starts_with('-') { -1 } else { 1 };
            let digits: String = z[1..].chars().filter(|c| *c != ':').collect();
            let (h, m) = match digits.len() {
                2 => (num(&digits)?, 0),
                4 => (num(&digits[..2])?, num(&digits[2..])?),
                _ => return Err(bad()),
            };
            if h > 14 || m > 59 {
                return Err(bad());
            }
            sign * (h * 60 + m)
        }
    };
    let (hms, frac) = match clock.split_once('.') {
        Some((a, b)) => (a, b),
        None => (clock, ""),
    };
    let hms: Vec<&str> = hms.split(':').collect();
    let (h, mi, sec) = match hms.as_slice() {
        [h, m] => (num(h)?, num(m)?, 0),
        [h, m, s] => (num(h)?, num(m)?, num(s)?),
        _ => return Err(bad()),
    };
    if h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let ms = if frac.is_empty() {
        0
    } else {
        let f: String = frac.chars().chain("000".chars()).take(3).collect();
        num(&f)?
    };
    if !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Ok(secs * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip_in_utc() {
        let ms = parse_time("2026-12-05 19:34:39.401+00").unwrap();
        assert_eq!(format_utc_ms(ms), "2026-12-05 19:34:39.401+00");
        assert_eq!(parse_time("2026-12-05T19:34:39.401Z").unwrap(), ms);
        assert_eq!(parse_time("2026-12-05T21:34:39.401+02:00").unwrap(), ms);
        assert_eq!(parse_time("2026-12-05 18:34:39.401-0100").unwrap(), ms);
        assert_eq!(parse_time("1970-01-01 00:00").unwrap(), 0);
        assert_eq!(format_utc(0), "1970-01-01 00:00:00+00");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00+00");
        for bad in [
            "",
            "yesterday",
            "2026-13-01 00:00",
            "2026-12-05",
            "2026-12-05 25:00",
            "2026-12-05 10:00+5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
