//! Where the agent's node-local `ServingService` listens: the one address
//! format of `gpuscale agent --serving-addr` and `gpuscale proxy --agent`.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A unix socket or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for ServingAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServingAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ServingAddr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl ServingAddr {
    /// `unix:/path` (or `unix:///path`), `IP:port`, or `off` (`None`). The
    /// error says what is allowed.
    pub fn parse(s: &str) -> Result<Option<ServingAddr>, &'static str> {
        let s = s.trim();
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if !path.starts_with('/') {
                return Err("an absolute socket path: unix:/run/gpuscale/serving.sock");
            }
            return Ok(Some(ServingAddr::Unix(PathBuf::from(path))));
        }
        s.parse()
            .map(|a| Some(ServingAddr::Tcp(a)))
            .map_err(|_| "unix:/path/to.sock, an IP:port such as 127.0.0.1:7071, or `off`")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_forms_parse_and_others_say_what_is_allowed() {
        assert_eq!(ServingAddr::parse(" off "), Ok(None));
        let unix = ServingAddr::parse("unix:///run/gpuscale/serving.sock").unwrap();
        assert_eq!(
            unix,
            Some(ServingAddr::Unix(PathBuf::from(
                "/run/gpuscale/serving.sock"
            )))
        );
        assert_eq!(unix.unwrap().to_string(), "unix:/run/gpuscale/serving.sock");
        assert!(matches!(
            ServingAddr::parse("10.0.0.1:7071"),
            Ok(Some(ServingAddr::Tcp(_)))
        ));
        assert!(
            ServingAddr::parse("unix:rel.sock")
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            ServingAddr::parse("node:7071")
                .unwrap_err()
                .contains("IP:port")
        );
    }
}
