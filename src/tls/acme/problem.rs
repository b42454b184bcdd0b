//! A failed order in the CA's own words (RFC 8555 §6.7 problem documents).

use rustls_acme::OrderError;
use rustls_acme::acme::{AuthStatus, Identifier, Problem};

/// The server's own words for a failed order: the problem document (RFC 8555 §6.7) of an
/// error response, or of the failed challenge or order, where the library exposes one.
pub fn describe_order_error(e: &OrderError) -> String {
    match e {
        OrderError::BadAuth(auth) => {
            let Identifier::Dns(name) = &auth.identifier;
            let problems: Vec<String> = auth
                .challenges
                .iter()
                .filter_map(|c| c.error.as_ref())
                .map(describe_problem)
                .collect();
            let status = match auth.status {
                AuthStatus::Pending => "pending",
                AuthStatus::Valid => "valid",
                AuthStatus::Invalid => "invalid",
                AuthStatus::Revoked => "revoked",
                AuthStatus::Expired => "expired",
                AuthStatus::Deactivated => "deactivated",
            };
            if problems.is_empty() {
                format!("authorization for {name} is {status}")
            } else {
                format!(
                    "authorization for {name} is {status}: {}",
                    problems.join("; ")
                )
            }
        }
        OrderError::BadOrder(order) => match &order.error {
            Some(p) => format!("order is invalid: {}", describe_problem(p)),
            None => "order is invalid".to_owned(),
        },
        OrderError::Acme(acme) => {
            let text = acme.to_string();
            http_problem(&text).unwrap_or(text)
        }
        OrderError::Rcgen(_)
        | OrderError::TooManyAttemptsAuth(_)
        | OrderError::ProcessingTimeout(_) => e.to_string(),
    }
}

fn describe_problem(p: &Problem) -> String {
    match (&p.typ, &p.detail) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => "no detail given".to_owned(),
    }
}

/// rustls-acme reports an error response only as text,
/// `http request error: non 2xx http status: 429 "{\"type\": ...}"` (the body in Rust's
/// `Debug` quoting); this recovers `HTTP 429: <type>: <detail>` from it.
fn http_problem(text: &str) -> Option<String> {
    const MARK: &str = "non 2xx http status: ";
    let rest = &text[text.find(MARK)? + MARK.len()..];
    let (status, quoted) = rest.split_once(' ')?;
    let body = unquote_debug(quoted)?;
    let problem: Problem = serde_json::from_str(&body).ok()?;
    Some(format!("HTTP {status}: {}", describe_problem(&problem)))
}

/// Reverses `format!("{:?}", s)` for the escapes it produces.
fn unquote_debug(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next()? {
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            '0' => out.push('\0'),
            'u' => {
                let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_responses_give_the_servers_problem_document() {
        let body = r#"{"type":"urn:ietf:params:acme:error:rateLimited","detail":"too many certificates (5) already issued for \"example.com\""}"#;
        let text = format!("acme error: http request error: non 2xx http status: 429 {body:?}");
        assert_eq!(
            http_problem(&text).unwrap(),
            "HTTP 429: urn:ietf:params:acme:error:rateLimited: too many certificates (5) already issued for \"example.com\""
        );
        assert_eq!(http_problem("io error: connection refused"), None);
        assert_eq!(
            unquote_debug(&format!("{:?}", "a\u{7}b\n\\")).unwrap(),
            "a\u{7}b\n\\"
        );
    }
}
