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
