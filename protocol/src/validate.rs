//! Checks on values that arrive from outside the process, and masking of personal data.
//! Each check returns a message that names the field and says what is wrong.

/// Longest id (call, courier, kiosk, site, request id) the contract accepts.
pub const MAX_ID_LEN: usize = 64;
/// Longest free-text field (labels, names, reasons).
pub const MAX_TEXT_LEN: usize = 200;
/// Heaviest parcel the contract accepts at all, in kilograms.
pub const MAX_WEIGHT_KG: f64 = 1000.0;

/// An id is 1–64 characters of `A-Z a-z 0-9 _ . -`: safe as a topic segment, a file name
/// and a log field.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Checks an id field.
pub fn id(field: &str, s: &str) -> Result<(), String> {
    if is_valid_id(s) {
        Ok(())
    } else {
        Err(format!(
            "{field}: must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 _ . -"
        ))
    }
}

/// Checks a free-text field's length and that it holds no control characters.
pub fn text(field: &str, s: &str) -> Result<(), String> {
    if s.chars().count() > MAX_TEXT_LEN {
        return Err(format!("{field}: longer than {MAX_TEXT_LEN} characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("{field}: holds control characters"));
    }
    Ok(())
}

/// Checks a WGS84 coordinate pair.
pub fn lat_lon(field: &str, lat: f64, lon: f64) -> Result<(), String> {
    if !lat.is_finite() || !(-90.0..=90.0).contains(&lat) {
        return Err(format!("{field}.lat: must be a number from -90 to 90"));
    }
    if !lon.is_finite() || !(-180.0..=180.0).contains(&lon) {
        return Err(format!("{field}.lon: must be a number from -180 to 180"));
    }
    Ok(())
}

/// Checks a phone number: an optional leading `+`, then 8–15 digits, optionally grouped by
/// single spaces or hyphens (`010-1234-5678`, `+82 10 1234 5678`).
pub fn phone(field: &str, s: &str) -> Result<(), String> {
    let body = s.strip_prefix('+').unwrap_or(s);
    let digits = body.bytes().filter(u8::is_ascii_digit).count();
    let shape_ok = !body.is_empty()
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'-' || b == b' ')
        && body.as_bytes().first().is_some_and(u8::is_ascii_digit)
        && body.as_bytes().last().is_some_and(u8::is_ascii_digit)
        && !body.contains("--")
        && !body.contains("  ");
    if shape_ok && (8..=15).contains(&digits) {
        Ok(())
    } else {
        Err(format!(
            "{field}: must be a phone number of 8-15 digits, like 010-1234-5678 or +82 10 1234 5678"
        ))
    }
}

/// Masks a phone number for anything but the relay channel: keeps the first three and the
/// last four digits and the separators, replaces the other digits with `*`.
pub fn mask_phone(s: &str) -> String {
    let total = s.bytes().filter(u8::is_ascii_digit).count();
    let mut seen = 0;
    s.chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen <= 3 || seen > total.saturating_sub(4) {
                    c
                } else {
                    '*'
                }
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_valid_id("abc-1_2.3"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("a+b"));
        assert!(!is_valid_id("a#"));
        assert!(!is_valid_id(&"x".repeat(65)));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn phones() {
        for ok in ["010-1234-5678", "+82 10 1234 5678", "01012345678"] {
            assert!(phone("tel", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "+",
            "1234",
            "010--1234-5678",
            "abc",
            "-0101234567",
            "0101234567890123",
        ] {
            assert!(phone("tel", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn masks_keep_only_ends() {
        assert_eq!(mask_phone("010-1234-5678"), "010-****-5678");
        assert_eq!(mask_phone("+82 10 1234 5678"), "+82 1* **** 5678");
    }

    #[test]
    fn coordinates() {
        assert!(lat_lon("l", 37.5, 127.0).is_ok());
        assert!(lat_lon("l", 91.0, 0.0).unwrap_err().contains("l.lat"));
        assert!(lat_lon("l", 0.0, f64::NAN).unwrap_err().contains("l.lon"));
        assert!(lat_lon("l", f64::INFINITY, 0.0).is_err());
    }
}
