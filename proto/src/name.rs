//! Names that become storage keys: origins (an edge agent's certificate name), node ids,
//! identities and durable consumer names. LMDB refuses keys over 511 bytes, and a key that
//! LMDB refuses must never reach a writer, so every such name is checked where it enters —
//! at the handshake, in a subscription, in a replicated record — and refused with
//! [`crate::ErrorCode::INVALID_NAME`].

/// The longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Checks a name: 1 to [`MAX_NAME_BYTES`] bytes of ASCII letters, digits, `.`, `_` and `-`.
/// `what` names the kind of name in the error ("durable name", "origin", …).
pub fn validate_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{what} is {} bytes long, more than {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} holds {c:?}: only ASCII letters, digits, '.', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_within_the_rules_pass_and_others_are_refused() {
        for ok in ["node-a", "site-a-gw-1", "a", "x.y_z-1", &"n".repeat(128)] {
            assert!(validate_name("name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            &"n".repeat(129),
            &"x".repeat(600),
            "a/b",
            "a b",
            "é",
            "a\0b",
            "a#",
        ] {
            assert!(validate_name("name", bad).is_err(), "{bad:?}");
        }
        assert!(validate_name("durable name", &"x".repeat(600))
            .unwrap_err()
            .contains("600 bytes"));
    }
}
