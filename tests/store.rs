//! The certificate store across restarts, and adoption of a directory written by the
//! system agentgate replaces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a test or bench stops loudly on failure

mod common;

use std::sync::Arc;

use common::*;

#[tokio::test]
async fn a_restart_keeps_every_uploaded_certificate() {
    let server = TestServer::start().await;
    let agents: Vec<_> = (0..5)
        .map(|i| server.pki.agent(&format!("keep-{i}")))
        .collect();
    for a in &agents {
        assert_eq!(server.upload(a).await.0, 200);
    }
    // Replace one, so the restart must load the newest.
    let rotated = server.pki.agent("keep-0");
    assert_eq!(server.upload(&rotated).await.0, 200);
    let server = server.restart().await;
    assert_eq!(server.store.len(), 5);
    for a in agents.iter().skip(1).chain([&rotated]) {
        assert!(
            matches!(
                SioWs::connect(&server, Some(a)).await.unwrap(),
                SioConnect::Ok(_)
            ),
            "{}",
            a.agent_id
        );
    }
    assert!(
        first_read_error(server.tls(Some(&agents[0])).await.unwrap())
            .await
            .is_some(),
        "replaced cert came back"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_directory_written_by_the_old_system_is_adopted_and_bad_files_are_skipped() {
    let pki = Arc::new(TestPki::new());
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    // What the Python service wrote: <agent_id>.pem holding the uploaded PEM as is
    // (here with Windows line endings and a trailing blank line, as uploads arrive).
    let old = pki.agent("07048933");
    std::fs::write(
        certs.join("07048933.pem"),
        format!("{}\n", old.cert_pem.replace('\n', "\r\n")),
    )
    .unwrap();
    let ossl = pki::openssl_self_signed("ossl-old", &["rsa:2048"], dir.path());
    std::fs::write(certs.join("ossl-old.pem"), &ossl.cert_pem).unwrap();
    // A CA-signed certificate the old system accepted without checks: adopted (pinned).
    let ca_signed = pki.ca_signed_agent("ca-old");
    std::fs::write(certs.join("ca-old.pem"), &ca_signed.cert_pem).unwrap();
    // Bad files: skipped with a log line, never fatal.
    std::fs::write(certs.join("garbage.pem"), "not a certificate").unwrap();
    std::fs::write(
        certs.join("wrong-name.pem"),
        pki.agent("someone-else").cert_pem,
    )
    .unwrap();
    std::fs::write(certs.join("bad name.pem"), pki.agent("bad name").cert_pem).unwrap();
    std::fs::write(certs.join("README.txt"), "ignored").unwrap();
    std::fs::write(certs.join(".agentgate-tmp-1-1"), "interrupted write").unwrap();

    let config = test_config(&pki, dir.path(), |_| {});
    let server = TestServer::start_in(pki, dir, config).await.unwrap();
    let mut ids: Vec<String> = server
        .store
        .list()
        .iter()
        .map(|c| c.agent_id.to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["07048933", "ca-old", "ossl-old"]);
    // Adopted files are not checked for self-signature at load; the API works it out.
    for (id, self_signed) in [("07048933", true), ("ossl-old", true), ("ca-old", false)] {
        let (status, body) = server
            .api("GET", &format!("/agent/certificate/{id}"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["self_signed"], self_signed, "{id}: {body}");
    }
    for agent in [&old, &ossl, &ca_signed] {
        let mut sio = match SioWs::connect(&server, Some(agent)).await.unwrap() {
            SioConnect::Ok(s) => s,
            SioConnect::Refused(v) => panic!("{}: {v}", agent.agent_id),
        };
        sio.emit(
            "heartbeat",
            serde_json::json!({"cpu_usage": 1, "memory_usage": 1, "disk_usage": 1}),
        )
        .await;
        assert_eq!(
            sio.next_event_within(10).await.unwrap().1["agent_id"],
            agent.agent_id.as_str()
        );
    }
    assert!(
        !server.store_dir().join(".agentgate-tmp-1-1").exists(),
        "leftover temp file not cleaned"
    );
    assert!(
        server.store_dir().join("garbage.pem").exists(),
        "a skipped file must be left alone"
    );
    server.stop().await;
}

#[tokio::test]
async fn store_directory_is_created_when_missing() {
    let server = TestServer::start_with(|c| c.store.dir = c.data_dir.join("nested/certs")).await;
    assert!(server.store_dir().is_dir());
    let agent = server.pki.agent("n1");
    assert_eq!(server.upload(&agent).await.0, 200);
    assert!(server.store_dir().join("n1.pem").is_file());
    server.stop().await;
}
