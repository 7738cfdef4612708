//! Wall-clock time as the index, the audit log and the JSON output write it: Unix
//! milliseconds and RFC 3339 in UTC.

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// UTC time as RFC 3339 with milliseconds (`2026-11-21T00:00:00.123Z`).
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let ms = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        // Beyond jiff's range (year 9999): clamp rather than print nonsense.
        Err(_) => "9999-12-31T23:59:59.999Z".to_string(),
    }
}

/// UTC time as RFC 3339 (`2026-11-21T00:00:00Z`).
pub fn rfc3339(unix_s: i64) -> String {
    match jiff::Timestamp::from_second(unix_s) {
        Ok(t) => t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        Err(_) if unix_s < 0 => "-009999-01-01T00:00:00Z".to_string(),
        Err(_) => "9999-12-31T23:59:59Z".to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_795_219_200), "2026-11-21T00:00:00Z");
        assert_eq!(super::rfc3339(951_825_600), "2000-02-29T12:00:00Z");
        assert_eq!(
            super::rfc3339_ms(1_795_219_200_123),
            "2026-11-21T00:00:00.123Z"
        );
        assert_eq!(super::rfc3339_ms(1_000), "1970-01-01T00:00:01.000Z");
        // Out of range never panics.
        assert_eq!(super::rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        assert_eq!(super::rfc3339_ms(u64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
