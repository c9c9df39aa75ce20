//! Request signatures shared by hooks (Ferry → back-end) and the server API (back-end →
//! Ferry): `Ferry-Signature: v1=<hex HMAC-SHA256(secret, timestamp + "." + body)>` with
//! `Ferry-Timestamp: <unix ms>`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Header with the signing time in Unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "ferry-timestamp";
/// Header with the signature.
pub const SIGNATURE_HEADER: &str = "ferry-signature";
/// Signatures further than this from the receiver's clock are refused (replays).
pub const SIGNATURE_WINDOW_MS: i64 = 5 * 60 * 1000;
/// Version tag in front of the hex digest.
const SIGNATURE_VERSION: &str = "v1=";

type HmacSha256 = Hmac<Sha256>;

/// The `Ferry-Signature` value of `body` signed at `timestamp_ms`.
pub fn sign(secret: &str, timestamp_ms: i64, body: &[u8]) -> String {
    let mut hex = String::with_capacity(SIGNATURE_VERSION.len() + 64);
    hex.push_str(SIGNATURE_VERSION);
    for byte in digest(secret, &timestamp_ms.to_string(), body) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

fn digest(secret: &str, timestamp: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// True when `signature` is the signature of `body` at `timestamp` and `timestamp` is within
/// `SIGNATURE_WINDOW_MS` of `now_ms`. Compares in constant time.
pub fn verify(secret: &str, timestamp: &str, signature: &str, body: &[u8], now_ms: i64) -> bool {
    let Ok(time) = timestamp.parse::<i64>() else {
        return false;
    };
    if (now_ms - time).abs() > SIGNATURE_WINDOW_MS {
        return false;
    }
    let Some(hex) = signature.strip_prefix(SIGNATURE_VERSION) else {
        return false;
    };
    let Some(given) = decode_hex(hex) else {
        return false;
    };
    let expected = digest(secret, timestamp, body);
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected.iter())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

/// True when `given` equals `secret`, in constant time (bearer tokens).
pub fn secret_matches(secret: &str, given: &str) -> bool {
    use sha2::Digest;
    let a: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    a.iter()
        .zip(b.iter())
        .fold(0u8, |diff, (x, y)| diff | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef";

    #[test]
    fn a_signature_verifies_only_for_its_body_time_and_secret() {
        let signature = sign(SECRET, 1_000, b"{}");
        assert!(signature.starts_with("v1=") && signature.len() == 67);
        assert!(verify(SECRET, "1000", &signature, b"{}", 1_000));
        assert!(!verify(SECRET, "1000", &signature, b"{ }", 1_000));
        assert!(!verify(SECRET, "1001", &signature, b"{}", 1_000));
        assert!(!verify(
            "another secret!!",
            "1000",
            &signature,
            b"{}",
            1_000
        ));
        assert!(!verify(SECRET, "1000", "v1=zz", b"{}", 1_000));
        assert!(!verify(SECRET, "x", &signature, b"{}", 1_000));
    }

    #[test]
    fn old_or_future_signatures_are_refused() {
        let signature = sign(SECRET, 0, b"a");
        assert!(verify(SECRET, "0", &signature, b"a", SIGNATURE_WINDOW_MS));
        assert!(!verify(
            SECRET,
            "0",
            &signature,
            b"a",
            SIGNATURE_WINDOW_MS + 1
        ));
        assert!(!verify(
            SECRET,
            "0",
            &signature,
            b"a",
            -SIGNATURE_WINDOW_MS - 1
        ));
    }

    #[test]
    fn the_signature_matches_a_known_hmac() {
        // printf '%s' '1700000000000.{"a":1}' | openssl dgst -sha256 -hmac 0123456789abcdef
        assert_eq!(
            sign(SECRET, 1_700_000_000_000, br#"{"a":1}"#),
            "v1=de32ced690ba7742b66a8b93053efa2a98f3a8fc16b2907325d41944cf17d735"
        );
    }

    #[test]
    fn bearer_secrets_compare_exactly() {
        assert!(secret_matches(SECRET, SECRET));
        assert!(!secret_matches(SECRET, "0123456789abcdeF"));
        assert!(!secret_matches(SECRET, ""));
    }
}
