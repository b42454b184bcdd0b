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
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
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
    key: DecodingKey,
}

impl JwtVerifier {
    /// Reads the key files of `config`.
    pub fn load(config: &JwtConfig, revocations: Revocations) -> Result<Self, JwtKeyError> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            keys.push(Key {
                alg: Algorithm::HS256,
                kid: None,
                key: DecodingKey::from_secret(secret.as_bytes()),
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
                key,
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

    /// Checks `token` and the route's `claims` (claim name -> allowed values); `now` is
    /// Unix seconds, for `iat` (jsonwebtoken reads the system clock for `exp`/`nbf`).
    pub fn verify(
        &self,
        token: &str,
        claims: &BTreeMap<String, Vec<String>>,
        now: i64,
    ) -> Result<VerifiedToken, TokenError> {
        let (alg_name, kid) = header(token)?;
        let alg: Option<Algorithm> = alg_name.parse().ok();
        let candidates: Vec<&Key> = match alg {
            Some(alg) => self.keys.iter().filter(|k| k.alg == alg).collect(),
            None => Vec::new(),
        };
        let Some(alg) = alg.filter(|_| !candidates.is_empty()) else {
            return Err(TokenError::Algorithm(alg_name));
        };
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = ["exp".to_owned()].into_iter().collect();
        let mut last = TokenError::Signature;
        let mut decoded = None;
        // A key with a kid only checks tokens naming it; a key without one checks any.
        for key in candidates
            .iter()
            .filter(|k| k.kid.is_none() || k.kid == kid)
        {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => {
                    decoded = Some(data.claims);
                    break;
                }
                Err(e) => {
                    last = match e.kind() {
                        ErrorKind::ExpiredSignature => TokenError::Expired,
                        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c.clone()),
                        ErrorKind::InvalidToken
                        | ErrorKind::Base64(_)
                        | ErrorKind::Json(_)
                        | ErrorKind::Utf8(_) => TokenError::Malformed,
                        _ => TokenError::Signature,
                    };
                    // Claim errors come after a good signature: no other key changes them.
                    if last != TokenError::Signature {
                        break;
                    }
                }
            }
        }
        let Some(payload) = decoded else {
            return Err(last);
        };
        if let Some(iat) = payload.get("iat").and_then(Value::as_i64)
            && iat > now.saturating_add(i64::try_from(self.leeway).unwrap_or(i64::MAX))
        {
            return Err(TokenError::IssuedInFuture);
        }
        for (claim, allowed) in claims {
            let ok = match payload.get(claim) {
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
        let jti = payload
            .get("jti")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(jti) = &jti
            && self.revocations.is_revoked(jti)
        {
            return Err(TokenError::Revoked);
        }
        Ok(VerifiedToken { jti })
    }
}

/// The `alg` and `kid` of the token's header, read before anything else so that a refused
/// algorithm is named in the answer.
fn header(token: &str) -> Result<(String, Option<String>), TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::Malformed),
    };
    match header.get("alg") {
        Some(Value::String(alg)) => Ok((alg.clone(), kid)),
        _ => Err(TokenError::Malformed),
    }
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
            key,
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
