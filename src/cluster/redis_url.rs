//! The Redis URL an operator writes (`redis://` or `rediss://`, optional `user:password@`,
//! optional `/db`), checked once at the edge and turned into the form redis-rs needs.
//!
//! redis-rs refuses a push sender on a RESP2 connection ("Can only pass push sender to a
//! connection using RESP3"), and the driver in [`super::driver`] needs pushes for pub/sub,
//! so `protocol=resp3` is added when the operator did not write it; writing any other
//! protocol is an error rather than a silent override. The password never reaches a log:
//! [`RedisUrl`]'s `Display` and `Debug` show `***` in its place.

use std::fmt;

use url::Url;

/// Why a Redis URL was refused. Each message names the part that is wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedisUrlError {
    #[error("not a URL ({0}); expected redis://[user:password@]host[:port][/db]")]
    Syntax(String),
    #[error("unsupported scheme `{0}`: use redis:// or rediss:// (TLS)")]
    Scheme(String),
    #[error("no host: expected redis://[user:password@]host[:port][/db]")]
    Host,
    #[error("database `{0}` is not a number (the path of a Redis URL is /<db>, e.g. /0)")]
    Database(String),
    #[error("protocol `{0}` is not supported: pub/sub needs RESP3 (protocol=resp3, the default)")]
    Protocol(String),
    #[error("unknown query parameter `{0}` (only `protocol` is accepted)")]
    Query(String),
    #[error("a fragment (#...) has no meaning in a Redis URL")]
    Fragment,
    #[error("redis-rs refused the URL: {0}")]
    Client(String),
}

/// A validated Redis URL with `protocol=resp3`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: Url,
}

impl RedisUrl {
    /// Parses what the operator wrote.
    pub fn parse(input: &str) -> Result<Self, RedisUrlError> {
        let mut url = Url::parse(input.trim()).map_err(|e| RedisUrlError::Syntax(e.to_string()))?;
        match url.scheme() {
            "redis" | "rediss" => {}
            other => return Err(RedisUrlError::Scheme(other.to_owned())),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(RedisUrlError::Host);
        }
        if url.fragment().is_some() {
            return Err(RedisUrlError::Fragment);
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() && db.parse::<u32>().is_err() {
            return Err(RedisUrlError::Database(db.to_owned()));
        }
        for (key, value) in url.query_pairs() {
            match &*key {
                "protocol" => match value.to_ascii_lowercase().as_str() {
                    "resp3" | "3" => {}
                    _ => return Err(RedisUrlError::Protocol(value.into_owned())),
                },
                _ => return Err(RedisUrlError::Query(key.into_owned())),
            }
        }
        // Written in the one spelling redis-rs accepts (it refuses `RESP3`).
        url.set_query(Some("protocol=resp3"));
        // Whatever redis-rs would refuse later is refused here, with the URL's own words.
        redis::Client::open(url.as_str()).map_err(|e| RedisUrlError::Client(e.to_string()))?;
        Ok(Self { url })
    }

    /// The full URL, password included, for redis-rs only: never log it.
    pub fn as_secret_str(&self) -> &str {
        self.url.as_str()
    }

    /// True for `rediss://`.
    pub fn is_tls(&self) -> bool {
        self.url.scheme() == "rediss"
    }

    /// The database number from the path (0 when absent).
    pub fn database(&self) -> u32 {
        self.url.path().trim_start_matches('/').parse().unwrap_or(0)
    }

    /// The form for logs and `check-config`: the password replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut shown = self.url.clone();
        if shown.password().is_some() {
            // Cannot fail: the URL has a host (checked in `parse`), so it can carry one.
            let _ = shown.set_password(Some("***"));
        }
        shown.into()
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedisUrl").field(&self.redacted()).finish()
    }
}

impl std::str::FromStr for RedisUrl {
    type Err = RedisUrlError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_url_gets_resp3() {
        let url = RedisUrl::parse("redis://127.0.0.1:6379").unwrap();
        assert_eq!(url.as_secret_str(), "redis://127.0.0.1:6379?protocol=resp3");
        assert!(!url.is_tls());
        assert_eq!(url.database(), 0);
    }

    #[test]
    fn written_resp3_is_kept_once() {
        for q in ["protocol=resp3", "protocol=RESP3", "protocol=3"] {
            let url = RedisUrl::parse(&format!("redis://h/2?{q}")).unwrap();
            assert_eq!(url.as_secret_str().matches("protocol").count(), 1, "{q}");
            assert_eq!(url.database(), 2);
        }
    }

    #[test]
    fn password_is_redacted_in_display_and_debug() {
        let url = RedisUrl::parse("rediss://agentgate:s3cret@redis.internal:6380/1").unwrap();
        assert!(url.is_tls());
        assert!(url.as_secret_str().contains("s3cret"));
        let shown = url.to_string();
        assert_eq!(
            shown,
            "rediss://agentgate:***@redis.internal:6380/1?protocol=resp3"
        );
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn password_without_user_is_redacted() {
        let url = RedisUrl::parse("redis://:pw@localhost").unwrap();
        assert_eq!(url.to_string(), "redis://:***@localhost?protocol=resp3");
    }

    #[test]
    fn user_without_password_is_shown() {
        let url = RedisUrl::parse("redis://reader@localhost").unwrap();
        assert_eq!(url.to_string(), "redis://reader@localhost?protocol=resp3");
    }

    #[test]
    fn refusals_name_the_wrong_part() {
        let cases: &[(&str, RedisUrlError)] = &[
            ("http://localhost", RedisUrlError::Scheme("http".into())),
            (
                "redis+unix:///tmp/r.sock",
                RedisUrlError::Scheme("redis+unix".into()),
            ),
            ("redis:///0", RedisUrlError::Host),
            (
                "redis://localhost/zero",
                RedisUrlError::Database("zero".into()),
            ),
            (
                "redis://localhost?protocol=resp2",
                RedisUrlError::Protocol("resp2".into()),
            ),
            (
                "redis://localhost?insecure=true",
                RedisUrlError::Query("insecure".into()),
            ),
            ("redis://localhost#x", RedisUrlError::Fragment),
        ];
        for (input, want) in cases {
            assert_eq!(&RedisUrl::parse(input).unwrap_err(), want, "{input}");
        }
        assert!(matches!(
            RedisUrl::parse("localhost:6379"),
            Err(RedisUrlError::Scheme(_) | RedisUrlError::Syntax(_))
        ));
        assert!(matches!(
            RedisUrl::parse("not a url"),
            Err(RedisUrlError::Syntax(_))
        ));
    }

    #[test]
    fn error_messages_read_well() {
        let e = RedisUrl::parse("http://x").unwrap_err().to_string();
        assert!(e.contains("redis://") && e.contains("`http`"), "{e}");
    }
}
