//! MQTT topic names and topic filters, exactly as MQTT 3.1.1 (§4.7) and MQTT 5 (§4.7) define
//! them.
//!
//! - A topic name is 1 to 65,535 bytes of UTF-8 without `+`, `#` or U+0000. Levels are
//!   separated by `/` and may be empty (`a//b`, `/a`).
//! - A filter is the same, except that `+` may stand alone in a level (one level, possibly
//!   empty) and `#` may stand alone in the last level (that level's parent and everything
//!   below it: `a/#` matches `a`).
//! - A filter whose first level is a wildcard does not match topics starting with `$`.

/// The longest topic name or filter MQTT can carry.
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a topic name or filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// It is the empty string.
    #[error("topic is empty")]
    Empty,
    /// It is longer than MQTT allows.
    #[error("topic is {0} bytes, more than 65535")]
    TooLong(usize),
    /// It contains U+0000.
    #[error("topic contains a NUL character")]
    Nul,
    /// A topic name contains a wildcard.
    #[error("topic name contains wildcard '{0}'")]
    Wildcard(char),
    /// A filter has `+` or `#` sharing a level with other characters, or `#` not last.
    #[error("misplaced wildcard '{0}' in filter")]
    MisplacedWildcard(char),
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks that `topic` is a valid topic name, as a PUBLISH may carry.
pub fn validate_topic_name(topic: &str) -> Result<(), TopicError> {
    check_common(topic)?;
    if let Some(c) = topic.chars().find(|&c| c == '+' || c == '#') {
        return Err(TopicError::Wildcard(c));
    }
    Ok(())
}

/// Checks that `filter` is a valid topic filter, as a SUBSCRIBE may carry.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedWildcard('#'));
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard('+'));
        }
    }
    Ok(())
}

/// True when the topic name `topic` matches the filter `filter`. Both are assumed valid;
/// an invalid pair simply does not match in any surprising way (no panic).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True when every topic that `inner` matches is matched by `outer` too, so a subscription
/// to `inner` lies within a permission to read `outer`. Conservative: it may say `false`
/// for exotic pairs that happen to be covered, never `true` for one that is not.
pub fn filter_within(inner: &str, outer: &str) -> bool {
    if (inner.starts_with('+') || inner.starts_with('#'))
        && !(outer.starts_with('+') || outer.starts_with('#'))
    {
        // `inner` reaches every non-`$` first level; `outer` names one.
        return false;
    }
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut i = inner.split('/');
    let mut o = outer.split('/');
    loop {
        match (i.next(), o.next()) {
            (_, Some("#")) => return true,
            (Some("#"), _) => return false,
            (Some(_), Some("+")) => {}
            (Some("+"), Some(_)) => return false,
            (Some(il), Some(ol)) if il == ol => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The matching examples of MQTT 3.1.1 §4.7.1 and MQTT 5 §4.7.1–4.7.2, and the `$`
    /// rules of §4.7.2.
    #[test]
    fn specification_matching_table() {
        let table: &[(&str, &str, bool)] = &[
            // '#' multi-level wildcard, §4.7.1.2
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/ranking",
                true,
            ),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("#", "sport/tennis", true),
            ("#", "/", true),
            ("sport/tennis/#", "sport/tennis", true),
            ("sport/tennis/#", "sport/tennisplayer1", false),
            // '+' single-level wildcard, §4.7.1.3
            ("sport/tennis/+", "sport/tennis/player1", true),
            ("sport/tennis/+", "sport/tennis/player2", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("+/tennis/#", "sport/tennis/player1", true),
            ("+/tennis/#", "sport/tennis", true),
            ("+", "", true),
            // '$' topics, §4.7.2
            ("#", "$SYS/broker/load", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/broker/load", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("$SYS/#", "$SYS", true),
            // case and exactness, §4.7.3
            ("ACCOUNTS", "Accounts", false),
            ("Accounts payable", "Accounts payable", true),
            ("/", "/", true),
            ("a//b", "a//b", true),
            ("a/+/b", "a//b", true),
            ("a/b", "a/b/", false),
            ("a/b/", "a/b", false),
            ("a/#", "a", true),
            ("a/#", "ab", false),
        ];
        for &(filter, topic, expected) in table {
            assert_eq!(
                validate_filter(filter),
                Ok(()),
                "filter {filter:?} should be valid"
            );
            assert_eq!(
                matches(filter, topic),
                expected,
                "filter {filter:?} vs topic {topic:?}"
            );
        }
    }

    #[test]
    fn filter_validity() {
        for ok in [
            "#", "+", "+/+", "a/+/b", "a/#", "/#", "+/#", "$SYS/#", "/", "//", "a b",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok:?}");
        }
        for (bad, err) in [
            ("", TopicError::Empty),
            ("sport/tennis#", TopicError::MisplacedWildcard('#')),
            ("sport/tennis/#/ranking", TopicError::MisplacedWildcard('#')),
            ("sport+", TopicError::MisplacedWildcard('+')),
            ("a/b+/c", TopicError::MisplacedWildcard('+')),
            ("##", TopicError::MisplacedWildcard('#')),
            ("a/\0", TopicError::Nul),
        ] {
            assert_eq!(validate_filter(bad), Err(err), "{bad:?}");
        }
        assert_eq!(
            validate_filter(&"a".repeat(65_536)),
            Err(TopicError::TooLong(65_536))
        );
    }

    #[test]
    fn topic_name_validity() {
        for ok in ["a", "/", "a//b", "$SYS/x", "site-a/line 1/temp", "ü/ß"] {
            assert_eq!(validate_topic_name(ok), Ok(()), "{ok:?}");
        }
        assert_eq!(validate_topic_name(""), Err(TopicError::Empty));
        assert_eq!(validate_topic_name("a/+"), Err(TopicError::Wildcard('+')));
        assert_eq!(validate_topic_name("a/#"), Err(TopicError::Wildcard('#')));
        assert_eq!(validate_topic_name("a\0b"), Err(TopicError::Nul));
        assert_eq!(validate_topic_name(&"a".repeat(65_535)), Ok(()));
        assert_eq!(
            validate_topic_name(&"a".repeat(65_536)),
            Err(TopicError::TooLong(65_536))
        );
    }

    #[test]
    fn filter_containment() {
        let table: &[(&str, &str, bool)] = &[
            ("site-a/#", "#", true),
            ("site-a/x", "site-a/#", true),
            ("site-a/#", "site-a/#", true),
            ("site-a", "site-a/#", true),
            ("site-a/+/t", "site-a/+/t", true),
            ("site-a/x/t", "site-a/+/t", true),
            ("site-a/+/t", "site-a/x/t", false),
            ("site-a/#", "site-a/+", false),
            ("#", "site-a/#", false),
            ("+/x", "site-a/#", false),
            ("site-b/#", "site-a/#", false),
            ("$SYS/#", "#", false),
            ("$SYS/#", "$SYS/#", true),
        ];
        for &(inner, outer, expected) in table {
            assert_eq!(
                filter_within(inner, outer),
                expected,
                "{inner:?} within {outer:?}"
            );
        }
    }
}
