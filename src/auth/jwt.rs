//! JWT bearer tokens for routes with `auth = "jwt"`: HS256 with `GATEWAY_JWT_SECRET`
//! (what the replaced Traefik gateway and its token function use, so tokens already in
//! clients' hands keep working) and RS256/ES256/EdDSA public keys from PEM or JWKS files.
//!
//! The algorithm is chosen by the key, never by the token: a token's `alg` only selects
//! among the configured keys, so `alg: none` and any algorithm without a key are refused
//! before a signature is looked at, and an HS256 token "signed" with an RSA public key
//! (the RFC 8725 §2.1 confusion) is checked against the HS256 secret and fails.
//! Signatures are verified with ring through the jsonwebtoken crate (9.x; 10.x would bring
//! a second crypto stack).

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, errors::ErrorKind};
use serde_json::Value;

use super::Revocations;
use crate::config::{JwtConfig, PublicKeyAlg};

/// Why a key file cannot be used; names the configuration key and the file.
#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error("invalid configuration: key `{key}`: JWT key file {path}: {reason}")]
    File {
        key: String,
        path: String,
        reason: String,
    },
}

/// Why a token was refused. Every variant but [`TokenError::Claim`] is a 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not a JWT (header.payload.signature)")]
    Malformed,
    #[error("token algorithm {0:?} is not accepted")]
    Algorithm(String),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf)")]
    NotYetValid,
    #[error("token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("token lacks the required claim {0:?}")]
    MissingClaim(String),
    #[error("token has been revoked")]
    Revoked,
    /// 403: a valid token for something else.
    #[error("token claim {claim:?} is not one of {allowed:?} for this route")]
    Claim { claim: String, allowed: Vec<String> },
}

/// A token that passed: its `jti`, for the access log.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub jti: Option<String>,
}

/// The configured keys and the revocation set; built once (and again on SIGHUP).
pub struct JwtVerifier {
    keys: Vec<Key>,
    leeway: u64,
    revocations: Revocations,
}

struct Key {
    alg: Algorithm,
    kid: Option<String>,
    check: Check,
}

/// How a key checks a signature.
enum Check {
    /// HS256: the HMAC key, built once when the keys load, checked with
    /// `ring::hmac::verify` (constant time) on the decoded signature.
    Hmac(ring::hmac::Key),
    /// RS256, ES256, EdDSA: ring through jsonwebtoken's `crypto::verify`.
    Public(DecodingKey),
}

impl Check {
    /// Whether `signature` (base64url, as in the token) signs `message` under this key:
    /// `Ok(false)` for a wrong signature, `Err` for one that is not base64url.
    fn verify(&self, alg: Algorithm, message: &str, signature: &str) -> Result<bool, TokenError> {
        match self {
            Self::Hmac(key) => {
                // Not base64url: a wrong signature, as jsonwebtoken says for HMAC (it
                // compares the base64 text).
                let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
                    return Ok(false);
                };
                Ok(ring::hmac::verify(key, message.as_bytes(), &signature).is_ok())
            }
            Self::Public(key) => {
                match jsonwebtoken::crypto::verify(signature, message.as_bytes(), key, alg) {
                    Ok(valid) => Ok(valid),
                    Err(e) => match e.kind() {
                        ErrorKind::Base64(_) => Err(TokenError::Malformed),
                        _ => Ok(false),
                    },
                }
            }
        }
    }
}

impl JwtVerifier {
    /// Reads the key files of `config`.
    pub fn load(config: &JwtConfig, revocations: Revocations) -> Result<Self, JwtKeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            keys.push(Key {
                alg: Algorithm::HS256,
                kid: None,
                check: Check::Hmac(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    secret.as_bytes(),
                )),
            });
        }
        for (i, k) in config.keys.iter().enumerate() {
            let err = |reason: String| JwtKeyError::File {
                key: format!("jwt.keys[{i}].pem_file"),
                path: k.pem_file.display().to_string(),
                reason,
            };
            let pem = std::fs::read(&k.pem_file).map_err(|e| err(e.to_string()))?;
            let (alg, key) = match k.alg {
                PublicKeyAlg::Rs256 => (Algorithm::RS256, DecodingKey::from_rsa_pem(&pem)),
                PublicKeyAlg::Es256 => (Algorithm::ES256, DecodingKey::from_ec_pem(&pem)),
                PublicKeyAlg::EdDsa => (Algorithm::EdDSA, DecodingKey::from_ed_pem(&pem)),
            };
            let key =
                key.map_err(|e| err(format!("not a {} public key in PEM: {e}", k.alg.as_str())))?;
            keys.push(Key {
                alg,
                kid: k.kid.clone(),
                check: Check::Public(key),
            });
        }
        if let Some(path) = &config.jwks_file {
            keys.extend(load_jwks(path)?);
        }
        Ok(Self {
            keys,
            leeway: config.leeway.as_secs(),
            revocations,
        })
    }

    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Checks `token` and the route's `claims` (claim name -> allowed values) at `now`
    /// (Unix seconds).
    ///
    /// In order, each step on what the one before let through: three base64url parts;
    /// a header naming an algorithm that a configured key has (else 401 naming it); the
    /// signature, by the keys of that algorithm (a key with a `kid` only for tokens naming
    /// it); the claims, a JSON object read once; `exp` present as a non-negative integer
    /// and not passed (`exp < now - leeway` is expired), `nbf` (when an integer) reached
    /// (`nbf > now + leeway` is not yet valid), `iat` not in the future; the route's
    /// claims; the `jti` not revoked. The semantics of `exp`/`nbf` and the missing-`exp`
    /// refusal are jsonwebtoken 9's `decode` (the unit tests compare the two), with the
    /// header and claims parsed once instead of several times and the HMAC key built
    /// once instead of per token.
    pub fn verify(
        &self,
        token: &str,
        claims: &BTreeMap<String, Vec<String>>,
        now: i64,
    ) -> Result<VerifiedToken, TokenError> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let (alg_name, kid) = header(header_b64)?;
        let alg = alg_name
            .parse::<Algorithm>()
            .ok()
            .filter(|alg| self.keys.iter().any(|k| k.alg == *alg));
        let Some(alg) = alg else {
            return Err(TokenError::Algorithm(alg_name));
        };
        // The signed bytes: `header.payload` as they are in the token.
        let message = &token[..header_b64.len() + 1 + payload_b64.len()];
        let mut signed = false;
        for key in self
            .keys
            .iter()
            .filter(|k| k.alg == alg && (k.kid.is_none() || k.kid == kid))
        {
            if key.check.verify(alg, message, signature)? {
                signed = true;
                break;
            }
        }
        if !signed {
            return Err(TokenError::Signature);
        }
        // The registered claims the check reads, then the route's claims, in that order.
        const REGISTERED: [&str; 4] = ["exp", "nbf", "iat", "jti"];
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .ok()
            .and_then(|bytes| {
                pick(&bytes, REGISTERED.len() + claims.len(), |name| {
                    REGISTERED.iter().position(|r| *r == name).or_else(|| {
                        claims
                            .keys()
                            .position(|c| c == name)
                            .map(|i| REGISTERED.len() + i)
                    })
                })
            })
            .ok_or(TokenError::Malformed)?;
        let (registered, route_claims) = payload.split_at(REGISTERED.len());
        let [exp, nbf, iat, jti] = registered else {
            return Err(TokenError::Malformed);
        };
        let now = i128::from(now);
        let leeway = i128::from(self.leeway);
        let Some(exp) = seconds(exp.as_ref()) else {
            return Err(TokenError::MissingClaim("exp".to_owned()));
        };
        if exp < now - leeway {
            return Err(TokenError::Expired);
        }
        if seconds(nbf.as_ref()).is_some_and(|nbf| nbf > now + leeway) {
            return Err(TokenError::NotYetValid);
        }
        if iat
            .as_ref()
            .and_then(Value::as_i64)
            .is_some_and(|iat| i128::from(iat) > now + leeway)
        {
            return Err(TokenError::IssuedInFuture);
        }
        for ((claim, allowed), value) in claims.iter().zip(route_claims) {
            let ok = match value {
                Some(Value::String(s)) => allowed.iter().any(|a| a == s),
                Some(Value::Array(items)) => items
                    .iter()
                    .any(|i| i.as_str().is_some_and(|s| allowed.iter().any(|a| a == s))),
                Some(Value::Number(n)) => allowed.iter().any(|a| *a == n.to_string()),
                Some(Value::Bool(b)) => allowed.iter().any(|a| *a == b.to_string()),
                _ => false,
            };
            if !ok {
                return Err(TokenError::Claim {
                    claim: claim.clone(),
                    allowed: allowed.clone(),
                });
            }
        }
        let jti = match jti {
            Some(Value::String(jti)) => Some(jti.as_str()),
            _ => None,
        };
        if let Some(jti) = jti
            && self.revocations.is_revoked(jti)
        {
            return Err(TokenError::Revoked);
        }
        Ok(VerifiedToken {
            jti: jti.map(str::to_owned),
        })
    }
}

/// A NumericDate claim (`exp`, `nbf`) as jsonwebtoken 9 reads it: a non-negative integer,
/// or a finite non-negative float (rounded); `None` when absent or anything else (so an
/// `exp` of another type is a missing `exp`, and such an `nbf` is not checked).
fn seconds(claim: Option<&Value>) -> Option<i128> {
    let Some(Value::Number(n)) = claim else {
        return None;
    };
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    match n.as_f64() {
        // A negative integer is neither a u64 nor a float here.
        Some(f) if n.is_f64() && f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
            // In range: the cast is exact up to rounding, as jsonwebtoken's.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Some(i128::from(f.round() as u64))
        }
        _ => None,
    }
}

/// The `alg` and `kid` of the token's header, read before anything else so that a refused
/// algorithm is named in the answer.
fn header(header: &str) -> Result<(String, Option<String>), TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    let mut header = pick(&bytes, 2, |name| match name {
        "alg" => Some(0),
        "kid" => Some(1),
        _ => None,
    })
    .ok_or(TokenError::Malformed)?
    .into_iter();
    let (alg, kid) = (header.next().flatten(), header.next().flatten());
    let kid = match kid {
        None => None,
        Some(Value::String(kid)) => Some(kid),
        Some(_) => return Err(TokenError::Malformed),
    };
    match alg {
        Some(Value::String(alg)) => Ok((alg, kid)),
        _ => Err(TokenError::Malformed),
    }
}

/// Parses `json`, which must be one JSON object, keeping only the members `slot` names:
/// `slot(name)` is the index in the result (`0..slots`) of a member to keep, `None` for one
/// to skip. What parsing the object into a `serde_json::Map` and reading those names gives
/// (`None` when the document is not one JSON object, the same syntax and nesting limits,
/// a name given twice read as its last value, as `Map` keeps it), without building the
/// map: the skipped members are checked, not stored. A token's claims are parsed once per
/// request on `jwt` routes (BENCHMARKS.md, "Proxy").
fn pick(
    json: &[u8],
    slots: usize,
    slot: impl Fn(&str) -> Option<usize>,
) -> Option<Vec<Option<Value>>> {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

    struct Members<'a, F> {
        slot: &'a F,
        values: Vec<Option<Value>>,
    }
    impl<'de, F: Fn(&str) -> Option<usize>> Visitor<'de> for Members<'_, F> {
        type Value = Vec<Option<Value>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Self::Value, A::Error> {
            while let Some(kept) = map.next_key_seed(Name(self.slot))? {
                match kept.and_then(|i| self.values.get_mut(i)) {
                    Some(value) => *value = Some(map.next_value()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(self.values)
        }
    }
    /// A member's name, mapped to its slot without being kept.
    struct Name<'a, F>(&'a F);
    impl<'de, F: Fn(&str) -> Option<usize>> DeserializeSeed<'de> for Name<'_, F> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de, F: Fn(&str) -> Option<usize>> Visitor<'de> for Name<'_, F> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
            Ok((self.0)(name))
        }
    }

    let mut de = serde_json::Deserializer::from_slice(json);
    let values = de
        .deserialize_map(Members {
            slot: &slot,
            values: vec![None; slots],
        })
        .ok()?;
    de.end().ok()?;
    Some(values)
}

fn load_jwks(path: &Path) -> Result<Vec<Key>, JwtKeyError> {
    let err = |reason: String| JwtKeyError::File {
        key: "jwt.jwks_file".to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let set: JwkSet = serde_json::from_slice(&text).map_err(|e| err(format!("not a JWKS: {e}")))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, jwk) in set.keys.iter().enumerate() {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Some(Algorithm::ES256)
            }
            AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
            _ => None,
        };
        let alg = match jwk.common.key_algorithm {
            None => implied,
            Some(KeyAlgorithm::RS256) => Some(Algorithm::RS256),
            Some(KeyAlgorithm::ES256) => Some(Algorithm::ES256),
            Some(KeyAlgorithm::EdDSA) => Some(Algorithm::EdDSA),
            Some(_) => None,
        }
        .filter(|a| Some(*a) == implied)
        .ok_or_else(|| {
            err(format!(
                "keys[{i}]: only RSA (RS256), P-256 (ES256) and Ed25519 (EdDSA) public keys are accepted"
            ))
        })?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| err(format!("keys[{i}]: {e}")))?;
        keys.push(Key {
            alg,
            kid: jwk.common.key_id.clone(),
            check: Check::Public(key),
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use std::time::Duration;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    fn claims() -> Value {
        serde_json::json!({"jti": "t1", "project": "p", "iat": now(), "exp": now() + 60})
    }

    fn config(dir: &Path, keys: Vec<crate::config::JwtKeyConfig>, jwks: Option<&str>) -> JwtConfig {
        let jwks_file = jwks.map(|text| {
            let path = dir.join("jwks.json");
            std::fs::write(&path, text).unwrap();
            path
        });
        JwtConfig {
            leeway: Duration::from_secs(0),
            hs256_secret: None,
            keys,
            jwks_file,
        }
    }

    /// The check as it was before it parsed the token itself: jsonwebtoken 9's `decode`
    /// (exp required, exp/nbf with the leeway at the system clock), after the same header
    /// read. The oracle of the comparison below.
    fn decision_of_jsonwebtoken(token: &str, secret: &[u8], leeway: u64) -> Result<(), TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let (alg, _) = header(h)?;
        if alg != "HS256" {
            return Err(TokenError::Algorithm(alg));
        }
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.leeway = leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &DecodingKey::from_secret(secret),
            &validation,
        )
        .map(|_| ())
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => TokenError::Expired,
            ErrorKind::ImmatureSignature => TokenError::NotYetValid,
            ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => TokenError::Malformed,
            _ => TokenError::Signature,
        })
    }

    /// A verifier with only the HS256 `secret`.
    fn hs256_verifier(secret: &str, leeway_secs: u64) -> JwtVerifier {
        JwtVerifier::load(
            &JwtConfig {
                leeway: Duration::from_secs(leeway_secs),
                hs256_secret: Some(secret.into()),
                keys: Vec::new(),
                jwks_file: None,
            },
            Revocations::new(),
        )
        .unwrap()
    }

    fn sign_raw(header: &str, payload: &str, secret: &[u8]) -> String {
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, message.as_bytes());
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Reading the token once (header, signature with a prebuilt HMAC key, claims) takes
    /// the decision jsonwebtoken's `decode` took, on every shape of header, signature and
    /// NumericDate that decides something: accepted, or refused with the same error.
    #[test]
    fn hs256_decisions_are_those_of_jsonwebtoken_decode() {
        let secret = b"compare-secret";
        let leeway = 30;
        let v = hs256_verifier("compare-secret", leeway);
        let t = now();
        let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
        let payloads = [
            format!(r#"{{"jti":"a","exp":{}}}"#, t + 60),
            format!(r#"{{"exp":{}}}"#, t - 60),
            format!(r#"{{"exp":{}}}"#, t - 10),
            format!(r#"{{"exp":{}.4}}"#, t + 60),
            format!(r#"{{"exp":{}.0}}"#, t - 60),
            r#"{"exp":18446744073709551615}"#.to_owned(),
            r#"{"exp":100000000000000000000}"#.to_owned(),
            r#"{"exp":1e300}"#.to_owned(),
            r#"{"exp":-5}"#.to_owned(),
            r#"{"exp":-0.0}"#.to_owned(),
            r#"{"exp":"99999999999"}"#.to_owned(),
            r#"{"exp":null}"#.to_owned(),
            r#"{"exp":true}"#.to_owned(),
            r#"{"jti":"a"}"#.to_owned(),
            format!(r#"{{"exp":{},"nbf":{}}}"#, t + 60, t + 120),
            format!(r#"{{"exp":{},"nbf":{}}}"#, t + 60, t + 10),
            format!(r#"{{"exp":{},"nbf":"soon"}}"#, t + 60),
            format!(r#"{{"exp":{},"nbf":-1}}"#, t + 60),
            format!(r#"{{"exp":{},"sub":5,"iss":[1],"aud":{{}}}}"#, t + 60),
            "[1,2]".to_owned(),
            "not json".to_owned(),
            String::new(),
        ];
        let mut tokens: Vec<String> = payloads.iter().map(|p| sign_raw(hs, p, secret)).collect();
        let good = sign_raw(hs, &payloads[0], secret);
        let (message, signature) = good.rsplit_once('.').unwrap();
        tokens.extend([
            sign_raw(hs, &payloads[0], b"another secret"),
            format!("{message}.{signature}="),
            format!("{message}.!!!"),
            format!("{message}."),
            format!("{message}.{}", &signature[..signature.len() - 1]),
            // The same signature bytes with non-zero trailing bits.
            format!("{message}.{}B", &signature[..signature.len() - 1]),
            format!("{good}.x"),
            message.to_owned(),
            String::new(),
            sign_raw(r#"{"alg":"none"}"#, &payloads[0], secret),
            sign_raw(r#"{"alg":"RS256"}"#, &payloads[0], secret),
            sign_raw(r#"{"alg":"XYZ"}"#, &payloads[0], secret),
            sign_raw(r#"{"typ":"JWT"}"#, &payloads[0], secret),
            sign_raw(r#"{"alg":"HS256","kid":5}"#, &payloads[0], secret),
            sign_raw(r#"{"alg":"HS256","kid":"k"}"#, &payloads[0], secret),
            sign_raw("[]", &payloads[0], secret),
            format!("%%%.{}", message.split_once('.').unwrap().1),
        ]);
        for token in &tokens {
            let ours = v.verify(token, &BTreeMap::new(), now()).map(|_| ());
            let theirs = decision_of_jsonwebtoken(token, secret, leeway);
            assert_eq!(ours, theirs, "token {token}");
        }
        // Sanity: the list exercises acceptance and every refusal kind.
        let decisions: Vec<_> = tokens
            .iter()
            .map(|t| v.verify(t, &BTreeMap::new(), now()).map(|_| ()))
            .collect();
        for expected in [
            Ok(()),
            Err(TokenError::Expired),
            Err(TokenError::NotYetValid),
            Err(TokenError::MissingClaim("exp".into())),
            Err(TokenError::Malformed),
            Err(TokenError::Signature),
            Err(TokenError::Algorithm("none".into())),
        ] {
            assert!(decisions.contains(&expected), "no case gives {expected:?}");
        }
    }

    /// `pick` reads what a whole `serde_json::Map` parse reads, for every kind of document.
    #[test]
    fn pick_reads_what_a_map_parse_reads() {
        let names = ["exp", "nbf", "jti", "project", "e\u{301}", "x"];
        let deep = format!("{{\"x\":{}{}}}", "[".repeat(200), "]".repeat(200));
        let docs = [
            r#"{"exp":1,"nbf":2.5,"jti":"a","project":["p","q"],"other":{"exp":9}}"#.to_owned(),
            r#"{"exp":1,"exp":2,"jti":null,"jti":"last"}"#.to_owned(),
            r#"{"\u0065xp":7,"project":"\"quoted\"","e\u0301":true}"#.to_owned(),
            r#" { "exp" : 1 } "#.to_owned(),
            r#"{"exp":1} trailing"#.to_owned(),
            r#"{"exp":1,}"#.to_owned(),
            r#"{"exp":1,"skip":[1,{"a":}]}"#.to_owned(),
            r#"{"exp":18446744073709551616,"nbf":-3,"x":1e400}"#.to_owned(),
            r#"{"x":"\ud800"}"#.to_owned(),
            r#"{"skip":"\q"}"#.to_owned(),
            r#"[{"exp":1}]"#.to_owned(),
            r#""exp""#.to_owned(),
            "{}".to_owned(),
            String::new(),
            "{\"exp\":1,\"bad\":\"\u{1}\"}".to_owned(),
            deep,
            format!("{{\"x\":{}1{}}}", "[".repeat(100), "]".repeat(100)),
        ];
        for doc in &docs {
            let ours = pick(doc.as_bytes(), names.len(), |n| {
                names.iter().position(|k| *k == n)
            });
            let theirs = serde_json::from_slice::<serde_json::Map<String, Value>>(doc.as_bytes())
                .ok()
                .map(|map| {
                    names
                        .iter()
                        .map(|n| map.get(*n).cloned())
                        .collect::<Vec<_>>()
                });
            assert_eq!(ours, theirs, "{doc}");
        }
    }

    /// One difference, by design: a claim named twice is read as its last value (RFC 7519
    /// §4 allows it), where jsonwebtoken refused a duplicated `exp` as malformed. A token
    /// is signed as a whole, so only a key holder can make one.
    #[test]
    fn a_duplicated_claim_is_read_as_its_last_value() {
        let v = hs256_verifier("s", 0);
        let t = now();
        let hs = r#"{"alg":"HS256"}"#;
        let live_last = sign_raw(
            hs,
            &format!(r#"{{"exp":{},"exp":{}}}"#, t - 60, t + 60),
            b"s",
        );
        assert!(v.verify(&live_last, &BTreeMap::new(), t).is_ok());
        let dead_last = sign_raw(
            hs,
            &format!(r#"{{"exp":{},"exp":{}}}"#, t + 60, t - 60),
            b"s",
        );
        assert_eq!(
            v.verify(&dead_last, &BTreeMap::new(), t).unwrap_err(),
            TokenError::Expired
        );
    }

    #[test]
    fn es256_from_a_pem_file_and_only_that_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = dir.path().join("es.pem");
        std::fs::write(&pem, key.public_key_pem()).unwrap();
        let v = JwtVerifier::load(
            &config(
                dir.path(),
                vec![crate::config::JwtKeyConfig {
                    alg: PublicKeyAlg::Es256,
                    pem_file: pem,
                    kid: None,
                }],
                None,
            ),
            Revocations::new(),
        )
        .unwrap();
        let enc = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let token = jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &enc).unwrap();
        let route = BTreeMap::from([("project".to_owned(), vec!["p".to_owned()])]);
        assert_eq!(
            v.verify(&token, &route, now()).unwrap().jti.as_deref(),
            Some("t1")
        );
        // No HS256 secret configured: an HS256 token is refused by its algorithm.
        let hs = jsonwebtoken::encode(
            &Header::default(),
            &claims(),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert_eq!(
            v.verify(&hs, &route, now()).unwrap_err(),
            TokenError::Algorithm("HS256".into())
        );
    }

    #[test]
    fn eddsa_from_a_jwks_file_matches_the_kid() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
            "x": URL_SAFE_NO_PAD.encode(key.public_key_raw()),
        }]});
        let v = JwtVerifier::load(
            &config(dir.path(), Vec::new(), Some(&jwks.to_string())),
            Revocations::new(),
        )
        .unwrap();
        let enc = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("ed-1".into());
        let token = jsonwebtoken::encode(&header, &claims(), &enc).unwrap();
        assert!(v.verify(&token, &BTreeMap::new(), now()).is_ok());
        header.kid = Some("other".into());
        let token = jsonwebtoken::encode(&header, &claims(), &enc).unwrap();
        assert_eq!(
            v.verify(&token, &BTreeMap::new(), now()).unwrap_err(),
            TokenError::Signature
        );
        // A symmetric key in a JWKS is refused when the file is loaded, naming the entry.
        let bad = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        let e = JwtVerifier::load(
            &config(dir.path(), Vec::new(), Some(&bad.to_string())),
            Revocations::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("keys[0]") && e.contains("jwks.json"), "{e}");
    }
}
