//! Config errors every role shares: an unreadable file, a schema error (unknown key, wrong
//! type), or an impossible value named by its key.

/// A config that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not the schema (unknown key, wrong type).
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// An impossible value.
    #[error("{key}: {why}")]
    Invalid {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
}

/// An impossible value of `key` (as `section.key`), and why.
pub fn invalid(key: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        why: why.into(),
    }
}

/// A config file's text.
pub fn read_file(path: &std::path::Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}
