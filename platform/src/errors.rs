//! Showing an error with its sources on one line, for logs, dead letters'
//! reasons and command-line tools (where `anyhow`'s `{:#}` is not at hand).

use std::fmt;

/// `error: cause: its cause …`.
pub struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::DisplayChain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the dead letters")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[test]
    fn every_source_follows_on_one_line() {
        assert_eq!(
            DisplayChain(&Outer(Inner)).to_string(),
            "cannot read the dead letters: connection refused"
        );
        assert_eq!(DisplayChain(&Inner).to_string(), "connection refused");
    }
}
