//! IaC blobs in S3 (`outpost server --blob-store s3://…`), against moto as
//! a real S3 endpoint on loopback:
//!
//! - the `Blobs` handle on a bucket: round trip, the same blob put twice,
//!   damaged objects detected, missing ones `NotFound`, S3 errors that name
//!   the bucket and key and never a credential;
//! - the real `outpost server`: a malformed `--blob-store` or missing AWS
//!   credentials stop it before it listens; with moto in its environment, a
//!   synced stack's source tarball lands in the bucket under the prefix.

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_s3::config::Credentials;
use outpost::client::{ClientConfig, StateDir};
use outpost::iac::IacError;
use outpost::iac::blobs::{Blobs, S3Connection, S3Location, sha256_hex};
use outpost_proto::iac::v1::iac_admin_client::IacAdminClient;
use outpost_tests::moto::Moto;
use outpost_tests::{bin, iac};

const BUCKET: &str = "outpost-blobs";
const KEY_ID: &str = "AKIDBLOBSTORETEST";
const SECRET: &str = "blob-store-secret-access-key";

/// The connection of the control plane to `moto`.
fn conn(moto: &Moto) -> S3Connection {
    S3Connection {
        region: "us-east-1".into(),
        endpoint: Some(moto.url()),
        credentials: Credentials::new(KEY_ID, SECRET, None, None, "test"),
    }
}

/// Moto with the bucket, and blobs under `prefix` in it.
async fn setup(prefix: &str) -> (Moto, Blobs) {
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let location = S3Location::parse(&format!("s3://{BUCKET}/{prefix}")).expect("location");
    let blobs = Blobs::s3(location, conn(&moto));
    (moto, blobs)
}

/// Every key in the bucket under `prefix`.
async fn keys(moto: &Moto, prefix: &str) -> Vec<String> {
    let out = moto
        .s3()
        .list_objects_v2()
        .bucket(BUCKET)
        .prefix(prefix)
        .send()
        .await
        .expect("list objects");
    out.contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_string))
        .collect()
}

async fn overwrite(moto: &Moto, key: &str, data: &[u8]) {
    moto.s3()
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(data.to_vec().into())
        .send()
        .await
        .expect("overwrite the object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs_round_trip_encrypted_under_the_prefix() {
    let (moto, b) = setup("prod/blobs").await;
    let d = b.put(b"hello".to_vec()).await.unwrap();
    assert_eq!(d, sha256_hex(b"hello"));
    assert_eq!(b.get(&d).await.unwrap(), b"hello");
    let key = format!("prod/blobs/sha256/{d}");
    assert_eq!(keys(&moto, "").await, vec![key.clone()]);
    let head = moto
        .s3()
        .head_object()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256),
        "{head:?}"
    );
    // Empty and binary blobs too.
    let empty = b.put(Vec::new()).await.unwrap();
    assert_eq!(b.get(&empty).await.unwrap(), b"");
    let bin: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let d = b.put(bin.clone()).await.unwrap();
    assert_eq!(b.get(&d).await.unwrap(), bin);
    assert_eq!(keys(&moto, "prod/blobs/sha256/").await.len(), 3);
    // A name that is not a digest never reaches the bucket.
    assert!(matches!(b.get("../x").await, Err(IacError::BadRequest(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs_put_twice_store_one_object() {
    let (moto, b) = setup("p").await;
    let other = Blobs::s3(
        S3Location::parse(&format!("s3://{BUCKET}/p")).unwrap(),
        conn(&moto),
    );
    let d = b.put(b"same bytes".to_vec()).await.unwrap();
    assert_eq!(other.put(b"same bytes".to_vec()).await.unwrap(), d);
    // Concurrent puts from two handles (two replicas) agree.
    for i in 0..10u32 {
        let data = format!("blob {i}").repeat(1000).into_bytes();
        let (da, db) = tokio::join!(b.put(data.clone()), other.put(data.clone()));
        let (da, db) = (da.unwrap(), db.unwrap());
        assert_eq!(da, db);
        assert_eq!(other.get(&da).await.unwrap(), data);
    }
    assert_eq!(keys(&moto, "p/sha256/").await.len(), 11);
    // An object of another size is not the blob: the next put replaces it.
    let key = format!("p/sha256/{d}");
    overwrite(&moto, &key, b"truncated").await;
    assert!(b.get(&d).await.is_err());
    b.put(b"same bytes".to_vec()).await.unwrap();
    assert_eq!(b.get(&d).await.unwrap(), b"same bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs_detect_a_damaged_object() {
    let (moto, b) = setup("p").await;
    let d = b.put(b"hello".to_vec()).await.unwrap();
    overwrite(&moto, &format!("p/sha256/{d}"), b"hellp").await;
    let err = b.get(&d).await.unwrap_err();
    assert!(
        matches!(err, IacError::Blob { op: "verify", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_blobs_missing_is_not_found_and_errors_name_bucket_and_key() {
    let (moto, b) = setup("p").await;
    let hello = sha256_hex(b"hello");
    let err = b.get(&hello).await.unwrap_err();
    assert!(matches!(err, IacError::NotFound(_)), "{err:?}");
    assert!(err.to_string().contains(&hello), "{err}");

    // A bucket that is not there is an error of S3, not a missing blob.
    let gone = Blobs::s3(
        S3Location::parse("s3://no-such-bucket/q").unwrap(),
        conn(&moto),
    );
    for err in [
        gone.get(&hello).await.unwrap_err(),
        gone.put(b"hello".to_vec()).await.unwrap_err(),
    ] {
        assert!(matches!(err, IacError::Blob { .. }), "{err:?}");
        let text = outpost_tests::error_chain(&err);
        assert!(
            text.contains(&format!("s3://no-such-bucket/q/sha256/{hello}")),
            "{text}"
        );
        assert!(
            !text.contains(KEY_ID) && !text.contains(SECRET),
            "no credential in {text}"
        );
    }
}

fn outpost(state: &Path) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(bin("outpost"));
    c.arg("--state-dir")
        .arg(state)
        .env("OUTPOST_LOG", "info")
        .env_remove("OUTPOST_BLOB_STORE")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("AWS_") {
            c.env_remove(name);
        }
    }
    c
}

/// Runs `cmd` to its end (bounded); returns its exit code and stderr.
async fn exit_of(mut cmd: tokio::process::Command) -> (Option<i32>, String) {
    cmd.stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("exits within 60s")
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_store_malformed_or_without_credentials_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    outpost::dev::ensure_pki(&state).expect("pki");
    for (value, needle) in [
        ("https://bucket/prefix", "does not start with s3://"),
        ("s3://Bad_Bucket/x", "valid bucket name"),
        ("s3://bucket/a//b", "segment"),
        ("s3://", "valid bucket name"),
    ] {
        for by_env in [false, true] {
            let mut c = outpost(&state.root);
            c.args(["server", "--listen", "127.0.0.1:0"]);
            if by_env {
                c.env("OUTPOST_BLOB_STORE", value);
            } else {
                c.args(["--blob-store", value]);
            }
            let (code, err) = exit_of(c).await;
            assert!(code.is_some_and(|c| c != 0), "{value}: {code:?} {err}");
            assert!(
                err.contains("--blob-store must be s3://BUCKET/PREFIX") && err.contains(needle),
                "{value} (env: {by_env}): {err}"
            );
        }
    }
    // Well formed, but no credentials in the environment.
    let mut c = outpost(&state.root);
    c.args(["server", "--listen", "127.0.0.1:0", "--blob-store"])
        .arg(format!("s3://{BUCKET}/p"));
    let (code, err) = exit_of(c).await;
    assert!(code.is_some_and(|c| c != 0), "{code:?} {err}");
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    assert!(
        !state.addr_file().exists() && !err.contains("control plane listening"),
        "refused before listening: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_store_s3_holds_a_synced_stacks_source() {
    let moto = Moto::start().await;
    moto.create_bucket(BUCKET).await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    outpost::dev::ensure_pki(&state).expect("pki");
    let main_tf = format!(
        "{}\nresource \"null_resource\" \"a\" {{}}\n",
        iac::NULL_PROVIDER
    );
    let repo = iac::repo(dir.path(), &main_tf);

    let log = dir.path().join("server.log");
    let mut c = outpost(&state.root);
    c.args(["server", "--listen", "127.0.0.1:0", "--blob-store"])
        .arg(format!("s3://{BUCKET}/outpost/blobs"))
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT_URL_S3", moto.url())
        .env("AWS_ACCESS_KEY_ID", KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .stderr(std::fs::File::create(&log).unwrap());
    let mut server = c.spawn().expect("spawn outpost server");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // The control plane answers the IaC API (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admin = loop {
        if let Ok(cfg) = ClientConfig::from_state(&state, None)
            && let Ok(ch) = cfg.channel().await
        {
            let mut a = IacAdminClient::new(ch);
            if a.list_stacks(outpost_proto::iac::v1::ListStacksRequest::default())
                .await
                .is_ok()
            {
                break a;
            }
        }
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited: {}",
            log_text()
        );
        assert!(
            Instant::now() < deadline,
            "no control plane in 60s: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    iac::apply(&mut admin, vec![iac::stack("net", &repo)]).await;
    let run = tokio::time::timeout(Duration::from_secs(60), iac::sync(&mut admin, "net"))
        .await
        .expect("sync within 60s");
    assert!(!run.is_empty());

    let found = keys(&moto, "outpost/blobs/sha256/").await;
    assert_eq!(found.len(), 1, "the source tarball: {found:?}");
    let object = moto
        .s3()
        .get_object()
        .bucket(BUCKET)
        .key(&found[0])
        .send()
        .await
        .unwrap();
    assert_eq!(
        object.server_side_encryption(),
        Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256)
    );
    let bytes = object.body.collect().await.unwrap().into_bytes().to_vec();
    assert_eq!(
        found[0],
        format!("outpost/blobs/sha256/{}", sha256_hex(&bytes))
    );
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    let mut sources = Vec::new();
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().ends_with("main.tf") {
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            sources.push(text);
        }
    }
    assert_eq!(sources, vec![main_tf], "the tarball holds the stack's code");
    // Nothing in the data directory.
    assert!(!state.data_dir().join("iac").join("blobs").exists());
    assert!(
        !log_text().contains(SECRET) && !log_text().contains(KEY_ID),
        "no credential in the log"
    );
    server.start_kill().expect("stop the server");
    let _ = tokio::time::timeout(Duration::from_secs(20), server.wait()).await;
}
