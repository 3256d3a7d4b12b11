//! The chat page at `/` in headless Chromium, driven by Playwright (`tests/browser/chat_page.mjs`)
//! against the server on loopback with the default model: the model picker, a streamed reply
//! (growing, equal to the API's), the stop button cancelling a long generation on the server,
//! the conversation surviving a reload, clearing it, and a server that needs an API key.
//!
//! Needs `node`, Chromium (`$CAMELID_CHROMIUM`, else `/usr/bin/chromium`) and `npm ci` in
//! `crates/server/tests/browser`. Without them the test says it skipped, unless
//! `CAMELID_BROWSER_TEST=required` (as in CI), which makes their absence a failure. A plain HTTP
//! test of the embedded files runs everywhere.

use camelid_engine::scheduler::SchedulerConfig;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{TestServer, MODEL_ID};

/// The key of the second server, started with `--api-key`.
const API_KEY: &str = "page-key";

/// What is missing to run the browser, if anything.
fn missing(browser_dir: &Path, chromium: &Path) -> Option<String> {
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Some("`node` is not on PATH".into());
    }
    if !chromium.is_file() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium, or set CAMELID_CHROMIUM)",
            chromium.display()
        ));
    }
    if !browser_dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Some(format!(
            "playwright-core is not installed (run `npm ci` in {})",
            browser_dir.display()
        ));
    }
    None
}

/// GET `path` over HTTP/1.1: the status line, the headers and the body.
fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.to_ascii_lowercase(), body.into())
}

/// Runs everywhere: the page and its two assets come from the binary, with their types, and
/// name nothing outside the server.
#[test]
fn the_page_and_its_assets_are_served_from_the_binary() {
    let mut server = TestServer::start(SchedulerConfig::default());
    let addr = server.addr;
    for (path, kind) in [
        ("/", "text/html"),
        ("/style.css", "text/css"),
        ("/app.js", "text/javascript"),
    ] {
        let (status, headers, body) = get(addr, path);
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert!(
            headers.contains(&format!("content-type: {kind}")),
            "{path}: {headers}"
        );
        assert!(!body.is_empty(), "{path}: empty");
        assert!(!body.contains("://"), "{path} names an outside resource");
        if path == "/" {
            for part in [
                "src=\"/app.js\"",
                "href=\"/style.css\"",
                "id=\"model\"",
                "id=\"stop\"",
            ] {
                assert!(body.contains(part), "the page lacks {part}");
            }
        }
    }
    server.begin_shutdown().join().expect("server thread");
}

#[test]
fn chat_page_streams_stops_and_keeps_the_conversation() {
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var_os("CAMELID_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if let Some(why) = missing(&browser_dir, &chromium) {
        if std::env::var("CAMELID_BROWSER_TEST").as_deref() == Ok("required") {
            panic!("CAMELID_BROWSER_TEST=required but {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }

    let mut server = TestServer::start(SchedulerConfig::default());
    let addr = server.addr;
    let mut keyed = TestServer::start_with_key(SchedulerConfig::default(), Some(API_KEY));

    let out = Command::new("node")
        .arg("chat_page.mjs")
        .arg(format!("http://{addr}"))
        .arg(MODEL_ID)
        .arg(format!("http://{}", keyed.addr))
        .arg(API_KEY)
        .env("CHROMIUM", &chromium)
        .current_dir(&browser_dir)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    server.begin_shutdown().join().expect("server thread");
    keyed.begin_shutdown().join().expect("keyed server thread");
    assert!(
        out.status.success(),
        "the chat page test failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert!(
        stdout.contains("ok: with the key entered, the page lists the models and chats"),
        "the chat page test ended early:\n{stdout}"
    );
}
