//! Typed errors for the library. The CLI wraps them with context (anyhow) and
//! exits non-zero; nothing in the library panics on bad input.

use std::path::PathBuf;

#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another one.
    #[error("invalid config: `{field}` {msg}")]
    Config { field: String, msg: String },

    /// A file could not be read, written or parsed.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A model asked a loaded file's parameters for one it does not hold
    /// (attend's name; loaders translate it to the file's).
    #[error("tensor `{name}` (shape {shape:?}) is missing")]
    MissingTensor { name: String, shape: Vec<usize> },

    /// A loaded file's parameter has another shape than the model needs
    /// (attend's name; loaders translate it to the file's).
    #[error("tensor `{name}` has shape {found:?}, the model needs {want:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        want: Vec<usize>,
    },

    /// Anything else the caller asked for that cannot be done.
    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a stream (stdout, a pipe) failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn file(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub fn msg(msg: impl Into<String>) -> Self {
        Error::Msg(msg.into())
    }
}
