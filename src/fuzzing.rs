//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`, never in a
//! release build). Each takes arbitrary bytes, runs the gateway's own code on them as it
//! would run on input from the network or an operator, and panics only where an invariant
//! of that code is broken: a panic here is a finding.
#![allow(clippy::expect_used, clippy::panic)] // a failed invariant must stop the fuzzer

use std::sync::{Arc, OnceLock};

use engineioxide_core::{Packet, ProtocolVersion};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use rustls::pki_types::UnixTime;
use socketioxide_core::packet::PacketData;
use socketioxide_core::parser::{Parse, ParseConfig, ParserState};
use socketioxide_parser_common::CommonParser;

use crate::config::RawConfig;
use crate::store::{CertStore, cert};
use crate::tls::verifier::AgentCertVerifier;

/// A fixed "now" for the upload rules (2027-06-01T00:00:00Z), so that a finding replays
/// the same way later; the seed certificate is valid then.
const NOW: i64 = 1_811_808_000;

/// The upload rules (`POST /agent/certificate`) on PEM text (first byte even) or on raw
/// DER wrapped in a CERTIFICATE block (first byte odd), as `agent-1`.
pub fn upload(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let pem = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE", rest.to_vec()))
    };
    if let Ok(stored) = cert::validate_upload("agent-1", &pem, NOW) {
        assert_eq!(
            stored.agent_id.as_str(),
            "agent-1",
            "stored under another id"
        );
        // What the store writes must read back as the same certificate.
        let again = cert::validate_upload("agent-1", &stored.to_pem(), NOW)
            .expect("the canonical PEM of an accepted certificate is accepted");
        assert_eq!(again.fingerprint, stored.fingerprint);
    }
}

/// The configuration file: TOML through the same figment layering and validation as
/// `agentgate check-config`. A configuration that validates must validate again from its
/// own effective settings, and render for check-config.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let raw: Result<RawConfig, _> = Figment::from(Serialized::defaults(RawConfig::default()))
        .merge(Toml::string(text))
        .extract();
    let Ok(raw) = raw else { return };
    if let Ok(config) = raw.validate("fuzz") {
        let _ = config.to_masked_toml();
        config
            .to_raw()
            .validate("fuzz (effective settings)")
            .expect("the effective settings of a valid config are valid");
    }
}

/// The verifier's decision on an arbitrary leaf, against a store that holds one real
/// agent certificate: never a panic, and never an identity for bytes that are not it.
pub fn verifier(data: &[u8]) {
    let (verifier, stored_der, now) = verifier_with_one_cert();
    if let Ok(identity) = verifier.decide(data, *now) {
        assert_eq!(data, stored_der.as_slice(), "an identity for foreign bytes");
        assert_eq!(identity.agent_id.as_str(), "agent-1");
    }
}

/// One Engine.IO text packet (as a WebSocket frame or a polling payload carries it), then
/// the Socket.IO packet inside it, then what the gateway does with a `heartbeat` event's
/// data or a command's acknowledgement.
pub fn socketio(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(engine) = Packet::parse(ProtocolVersion::V4, text.to_owned()) else {
        return;
    };
    let Packet::Message(message) = engine else {
        return;
    };
    let parser = CommonParser;
    let Ok(packet) = parser.decode_str(&ParseConfig::default(), &ParserState::default(), message)
    else {
        return;
    };
    match packet.inner {
        PacketData::Event(mut value, _) | PacketData::BinaryEvent(mut value, _) => {
            let is_heartbeat = parser.read_event(&value).is_ok_and(|e| e == "heartbeat");
            let data = parser.decode_value::<serde_json::Value>(&mut value, true);
            if is_heartbeat {
                // Every heartbeat is stored: always an object with every known field.
                let reading = crate::agents::heartbeat::read(data.map_err(|e| e.to_string()));
                let stored = reading.stored.as_object().expect("stored as an object");
                assert!(stored.contains_key("cpu_usage") && stored.contains_key("disk_usage"));
            }
        }
        PacketData::EventAck(mut value, _) | PacketData::BinaryAck(mut value, _) => {
            // A command's reply is relayed to the API caller as JSON.
            if let Ok(reply) = parser.decode_value::<serde_json::Value>(&mut value, false) {
                let _ = serde_json::to_vec(&reply);
            }
        }
        _ => {}
    }
}

/// The JWT check of `auth = "jwt"` routes on an arbitrary token, with an HS256 secret and
/// an RS256 and an ES256 public key configured (`fuzz/keys/`): never a panic, and a token
/// it accepts verifies again the same way and carries a numeric `exp` (the check requires
/// one; a token without it would never expire).
pub fn jwt(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let verifier = jwt_verifier();
    let none = std::collections::BTreeMap::new();
    let Ok(first) = verifier.verify(token, &none, NOW) else {
        return;
    };
    let again = verifier
        .verify(token, &none, NOW)
        .expect("an accepted token is accepted again");
    assert_eq!(first.jti, again.jti, "the same token read as another jti");
    let payload = token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, p).ok()
        })
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .expect("an accepted token has a JSON payload");
    assert!(
        payload.get("exp").is_some_and(serde_json::Value::is_number),
        "accepted without a numeric exp: {payload}"
    );
    // A route's claim rule on the same token: a decision, never a panic.
    let rule = std::collections::BTreeMap::from([("project".to_owned(), vec!["fuzz".to_owned()])]);
    let _ = verifier.verify(token, &rule, NOW);
}

/// The verifier of [`jwt`]: secret `fuzz-secret`, the public keys of `fuzz/keys/` written
/// to a directory of this process and loaded as `[[jwt.keys]]` are.
fn jwt_verifier() -> &'static crate::auth::JwtVerifier {
    static ONE: OnceLock<crate::auth::JwtVerifier> = OnceLock::new();
    ONE.get_or_init(|| {
        use crate::config::{JwtConfig, JwtKeyConfig, PublicKeyAlg};
        let dir = std::env::temp_dir().join(format!("agentgate-fuzz-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let key = |name: &str, pem: &str, alg| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write a key file");
            JwtKeyConfig {
                alg,
                pem_file: path,
                kid: None,
            }
        };
        let config = JwtConfig {
            leeway: std::time::Duration::from_secs(60),
            hs256_secret: Some("fuzz-secret".to_owned()),
            keys: vec![
                key(
                    "rs256.pub.pem",
                    include_str!("../fuzz/keys/rs256.pub.pem"),
                    PublicKeyAlg::Rs256,
                ),
                key(
                    "es256.pub.pem",
                    include_str!("../fuzz/keys/es256.pub.pem"),
                    PublicKeyAlg::Es256,
                ),
            ],
            jwks_file: None,
        };
        crate::auth::JwtVerifier::load(&config, crate::auth::Revocations::new())
            .expect("the fuzz keys load")
    })
}

/// A verifier whose store holds one certificate made at start, its DER, and a moment in
/// its validity.
fn verifier_with_one_cert() -> &'static (AgentCertVerifier, Vec<u8>, UnixTime) {
    static ONE: OnceLock<(AgentCertVerifier, Vec<u8>, UnixTime)> = OnceLock::new();
    ONE.get_or_init(|| {
        let id = crate::identity::AgentId::parse("agent-1").expect("a valid id");
        let generated = crate::certgen::generate(&id, 3650).expect("rcgen");
        let now = UnixTime::now();
        let stored = cert::validate_upload("agent-1", &generated.cert_pem, now.as_secs() as i64)
            .expect("a generated certificate is accepted");
        let der = stored.der.to_vec();
        let dir = std::env::temp_dir().join(format!("agentgate-fuzz-{}", std::process::id()));
        let store = CertStore::open_with_indexed(&dir, vec![stored]).expect("store");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        (
            AgentCertVerifier::new(store, provider.signature_verification_algorithms),
            der,
            now,
        )
    })
}
